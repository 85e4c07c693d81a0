//! `bld-remote-core`: everything of `bld_remote` that is neither Python nor the command line. Runs on the
//! service's own native threads inside Blender (server, jobs, protocol), and in any process that talks to
//! a service (client, instance descriptors). No pyo3: tested with plain `cargo test`.
//! This file is only the manifest of modules.

pub mod auth;
pub mod client;
pub mod config;
pub mod instances;
pub mod jobs;
pub mod persist;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod store;
