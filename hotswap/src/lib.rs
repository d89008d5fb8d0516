//! hotswap: steer new connections of a service to whichever process generation is active, and
//! switch between generations with one atomic map update.
//!
//! The library holds everything; the `hotswap` binary only parses arguments.

pub mod backend;
pub mod model;
pub mod registry;
pub mod socket;
