//! Gives the crate a library target so tooling (rust-analyzer, `cargo doc`) sees the program
//! modules, as in aya-template; the programs themselves are in `main.rs`.

#![no_std]
