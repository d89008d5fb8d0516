//! The schema check of the Kubernetes manifests in `deploy/kubernetes/`: kubernetes-validate
//! from PyPI, which bundles the API's JSON schemas (strict variants included) for each
//! Kubernetes version it knows, so checking needs no cluster and no network. Installed, pinned,
//! in a private virtual environment; `tests/tests/kubernetes.rs` runs it.

use std::path::PathBuf;

use anyhow::Result;

use crate::setup::ensure_python_venv;

/// kubernetes-validate's version: its schemas go up to the Kubernetes version of the same
/// number.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Installs kubernetes-validate where missing, with the two packages whose versions decide
/// what the check accepts pinned as well; returns the path of its command.
pub fn ensure_validator() -> Result<PathBuf> {
    let venv = ensure_python_venv(
        &format!("kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"),
        &[
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
            "jsonschema==4.26.0",
            "PyYAML==6.0.4",
        ],
    )?;
    Ok(venv.join("bin").join("kubernetes-validate"))
}
