//! Parses and validates every `src/gpu/*.wgsl` with naga, without an adapter, so
//! WGSL mistakes are caught on machines with no GPU.
//!
//! Files whose first line is `// enable subgroups;` (`matmul_subgroup.wgsl`;
//! naga 30 refuses the directive itself, see that file) are validated with
//! naga's subgroup capability, as wgpu does on a device with
//! `wgpu::Features::SUBGROUP`, and must fail without it; every other file is
//! validated without any capability, as on a device without optional features.
//!
//! A file with a line `// prelude: NAME.wgsl` in its leading comment is
//! validated with that file in front of it, as its launcher compiles it
//! (`matmul_common.wgsl` before `matmul.wgsl` and `matmul_subgroup.wgsl`). A
//! prelude is not a module on its own: it is validated only in front of the
//! files that name it, and must be named by at least one.
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
    // Preludes named by the files: `// prelude: NAME` in the leading comment.
    let preludes_of = |text: &str| -> Vec<String> {
        text.lines()
            .take_while(|l| l.starts_with("//"))
            .filter_map(|l| l.strip_prefix("// prelude: "))
            .map(|n| n.trim().to_owned())
            .collect()
    };
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read_to_string(p).expect("readable wgsl"),
            )
        })
        .collect();
    let preludes: std::collections::BTreeSet<String> =
        texts.iter().flat_map(|(_, t)| preludes_of(t)).collect();
    for prelude in &preludes {
        assert!(
            texts.iter().any(|(n, _)| n == prelude),
            "a file names the prelude {prelude}, which is not in {}",
            dir.display()
        );
    }
    let mut failures = Vec::new();
    let mut with_subgroups = Vec::new();
    let mut composed = Vec::new();
    for (name, text) in &texts {
        if preludes.contains(name) {
            continue;
        }
        let mut source = String::new();
        for prelude in preludes_of(text) {
            let (_, p) = texts
                .iter()
                .find(|(n, _)| *n == prelude)
                .expect("checked above");
            source.push_str(p);
            composed.push(format!("{prelude} + {name}"));
        }
        source.push_str(text);
        let name = name.clone();
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
        let subgroups = text.lines().next() == Some("// enable subgroups;");
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
    for wanted in [
        "matmul_common.wgsl + matmul.wgsl",
        "matmul_common.wgsl + matmul_subgroup.wgsl",
    ] {
        assert!(
            composed.iter().any(|c| c == wanted),
            "{wanted} not validated together: {composed:?}"
        );
    }
}
