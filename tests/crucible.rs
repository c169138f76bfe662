//! The crucible plugin (the seed service's tasks) against stand-in executor and storage
//! services, through a real worker and Redis: the same tests for the Rust plugin
//! (`plugins/crucible`) and the Python one (`plugins/crucible-py`, built by `taskhost build`).

mod rust {
    const PLUGIN: &str = "crucible";
    include!("crucible_cases.rs");
}

mod python {
    const PLUGIN: &str = "crucible-py";
    include!("crucible_cases.rs");
}
