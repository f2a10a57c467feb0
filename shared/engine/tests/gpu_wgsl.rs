//! Parses and validates every `src/gpu/*.wgsl` with naga, without an adapter, so
//! WGSL mistakes are caught on machines with no GPU.
//!
//! Files whose first line is `// enable subgroups;` (`matmul_subgroup.wgsl`;
//! naga 30 refuses the directive itself, see that file) are validated with
//! naga's subgroup capability, as wgpu does on a device with
//! `wgpu::Features::SUBGROUP`, and must fail without it; every other file is
//! validated without any capability, as on a device without optional features.
//!
//! ```text
//! cargo test -p fedsb-engine --test gpu_wgsl
//! ```

use std::path::Path;

#[test]
fn every_wgsl_file_validates_with_naga() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("src/gpu exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no .wgsl files found in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    let mut with_subgroups = Vec::new();
    for path in &files {
        let source = std::fs::read_to_string(path).expect("readable wgsl");
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let module = match naga::front::wgsl::parse_str(&source) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!(
                    "{name}: parse error:\n{}",
                    e.emit_to_string(&source)
                ));
                continue;
            }
        };
        let subgroups = source.lines().next() == Some("// enable subgroups;");
        let capabilities = if subgroups {
            with_subgroups.push(name.clone());
            // Without the capability the module must be refused, which is why
            // it cannot share a file with kernels every device runs.
            let bare = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            )
            .validate(&module);
            assert!(bare.is_err(), "{name} validates without subgroups");
            // The real directive (which the launcher prepends for the browser)
            // is still refused by naga 30 (gfx-rs/wgpu#5555); once naga accepts
            // it, it can replace the comment at the top of the file.
            assert!(
                naga::front::wgsl::parse_str(&format!("enable subgroups;\n{source}")).is_err(),
                "naga now accepts `enable subgroups;`: put it into {name}"
            );
            naga::valid::Capabilities::SUBGROUP
        } else {
            naga::valid::Capabilities::empty()
        };
        let mut validator =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities);
        match validator.validate(&module) {
            Ok(_) => eprintln!(
                "{name}: ok ({} entry points{})",
                module.entry_points.len(),
                if subgroups { ", subgroups" } else { "" }
            ),
            Err(e) => failures.push(format!(
                "{name}: validation error:\n{}",
                e.emit_to_string(&source)
            )),
        }
        assert!(!module.entry_points.is_empty(), "{name} has no entry point");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        with_subgroups.iter().any(|n| n == "matmul_subgroup.wgsl"),
        "matmul_subgroup.wgsl not validated with subgroups: {with_subgroups:?}"
    );
}
