//! BGP speaker (work in progress).

pub mod codec;
pub mod fsm;
pub mod rib_out;
