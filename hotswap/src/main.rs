//! The `hotswap` binary: everything lives in the library.
fn main() -> std::process::ExitCode {
    hotswap::cli::main()
}
