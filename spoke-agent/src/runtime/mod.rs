//! Runtimes: what actually runs a cluster's VMs. Each one reports inventory (`InventorySource`)
//! and carries out the hub's VM lifecycle commands.

pub mod qemu;
