//! The `taskhost` binary: everything lives in the library; see [`taskhost::cli`].

fn main() -> std::process::ExitCode {
    taskhost::cli::main()
}
