//! Health monitors.

pub mod port;
