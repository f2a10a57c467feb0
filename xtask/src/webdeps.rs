//! `cargo xtask fetch-web-deps`: the page's third-party JavaScript, pinned
//! and vendored at build time into `www/vendor/` (git-ignored).
//!
//! Each package is downloaded once from the npm registry into
//! `target/downloads/`, checked against its pinned SHA-256, and the files
//! the page needs are copied out of the tarball. Nothing is fetched at page
//! load time from a CDN.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A pinned npm package and the files the page uses from it.
struct WebDep {
    name: &'static str,
    version: &'static str,
    /// SHA-256 of the registry tarball.
    sha256: &'static str,
    /// (path inside the tarball, name under `www/vendor/`).
    files: &'static [(&'static str, &'static str)],
}

/// uPlot: a small (≈ 50 KB), dependency-free, MIT-licensed chart library.
const DEPS: &[WebDep] = &[WebDep {
    name: "uplot",
    version: "1.6.32",
    sha256: "4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d",
    files: &[
        ("package/dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
        ("package/dist/uPlot.min.css", "uPlot.min.css"),
        ("package/LICENSE", "uPlot.LICENSE"),
    ],
}];

fn sha256_of(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum (coreutils)")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Downloads (if needed), verifies and unpacks every pinned web dependency.
pub fn fetch_web_deps(root: &Path) -> Result<()> {
    let downloads = root.join("target/downloads");
    let vendor = root.join("www/vendor");
    std::fs::create_dir_all(&downloads)?;
    std::fs::create_dir_all(&vendor)?;
    for dep in DEPS {
        let done = dep
            .files
            .iter()
            .all(|(_, name)| vendor.join(name).is_file())
            && std::fs::read_to_string(vendor.join(format!("{}.version", dep.name)))
                .is_ok_and(|v| v.trim() == dep.version);
        if done {
            continue;
        }
        let tarball = downloads.join(format!("{}-{}.tgz", dep.name, dep.version));
        if !tarball.is_file() || sha256_of(&tarball)? != dep.sha256 {
            let url = format!(
                "https://registry.npmjs.org/{0}/-/{0}-{1}.tgz",
                dep.name, dep.version
            );
            eprintln!("xtask: downloading {url}");
            let part = tarball.with_extension("tgz.part");
            let status = Command::new("curl")
                .args(["--fail", "--location", "--silent", "--show-error"])
                .args(["--retry", "3", "--output"])
                .arg(&part)
                .arg(&url)
                .status()
                .context("running curl")?;
            if !status.success() {
                bail!("downloading {url} failed");
            }
            let found = sha256_of(&part)?;
            if found != dep.sha256 {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{url} has SHA-256 {found}, expected the pinned {}",
                    dep.sha256
                );
            }
            std::fs::rename(&part, &tarball)?;
        }
        let unpack = downloads.join(format!("{}-{}", dep.name, dep.version));
        let _ = std::fs::remove_dir_all(&unpack);
        std::fs::create_dir_all(&unpack)?;
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&unpack)
            .args(dep.files.iter().map(|(inner, _)| *inner))
            .status()
            .context("running tar")?;
        if !status.success() {
            bail!("unpacking {} failed", tarball.display());
        }
        for (inner, name) in dep.files {
            std::fs::copy(unpack.join(inner), vendor.join(name))
                .with_context(|| format!("copying {inner} to www/vendor/{name}"))?;
        }
        std::fs::write(
            vendor.join(format!("{}.version", dep.name)),
            format!("{}\n", dep.version),
        )?;
        eprintln!(
            "xtask: {} {} vendored into www/vendor/",
            dep.name, dep.version
        );
    }
    Ok(())
}
