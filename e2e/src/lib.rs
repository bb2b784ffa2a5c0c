//! drover-e2e: the test bed.
pub mod postgres;
