//! hotswap: steer new connections of a service to whichever process generation is active, and
//! switch between generations with one atomic map update.
//!
//! The library holds everything; the `hotswap` binary only parses arguments.

pub mod access;
pub mod activation;
pub mod admission;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod exporter;
pub mod files;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod handoff;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod socket;
pub mod supervisor;

/// A file-system or socket operation on a path failed; the modules' error enums carry it.
#[derive(Debug, thiserror::Error)]
#[error("{what} {} failed", path.display())]
pub struct PathError {
    /// What was tried, e.g. `creating`.
    pub what: &'static str,
    /// On which path.
    pub path: std::path::PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl PathError {
    /// A `map_err` adapter: `std::fs::create_dir_all(dir).map_err(PathError::at("creating", dir))`.
    pub fn at(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self { what, path, source }
    }
}

/// `path` with `suffix` added to its file name: `/run/hotswap/hotswap.sock` + `.lock`.
pub(crate) fn with_suffix(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// An error and all its causes on one line, `outer: inner: innermost`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Transparent wrappers repeat their inner message; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
