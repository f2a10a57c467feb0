//! Parses and validates every `src/gpu/*.wgsl` with naga, without an adapter, so
//! WGSL mistakes are caught on machines with no GPU.
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
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        match validator.validate(&module) {
            Ok(_) => eprintln!("{name}: ok ({} entry points)", module.entry_points.len()),
            Err(e) => failures.push(format!(
                "{name}: validation error:\n{}",
                e.emit_to_string(&source)
            )),
        }
        assert!(!module.entry_points.is_empty(), "{name} has no entry point");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
