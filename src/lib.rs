//! `imdsd` gives every Docker container its own AWS IAM role, the way EC2 gives an instance its
//! instance-profile role: it answers on the instance metadata address, works out who is calling from
//! the caller's IP, and serves that caller's role credentials in exactly the bytes the AWS SDKs expect.
//!
//! Where to start reading: [`app`] wires the parts together from a validated [`config::Config`];
//! [`imds`] is the HTTP surface; [`identity`] turns a caller into a workload and its role;
//! [`credentials`] obtains, caches and refreshes the role credentials.
//!
//! Dependencies point one way: `imds → identity` and `imds → credentials → source`. The HTTP layer
//! never sees an SDK type.

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod docker;
pub mod doctor;
pub mod ecs;
pub mod host;
pub mod identity;
pub mod imds;
pub mod index;
pub mod instance;
pub mod liveness;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod network;
pub mod prefetch;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod state;
