//! hotswap: steer new connections of a service to whichever process generation is active, and
//! switch between generations with one atomic map update.
//!
//! The library holds everything; the `hotswap` binary only parses arguments.

pub mod activation;
pub mod backend;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod doctor;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod socket;
pub mod supervisor;

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
