//! Resets of the stored position, for reprocessing. A reset is a request stored in the state
//! collection: [`request`] is the `perfagg reset` command that checks, confirms and stores
//! it, and [`perform`] is the daemon side that carries it out while holding the lease, at a
//! batch boundary or at start-up.

pub mod perform;
pub mod request;

pub use perform::perform;
