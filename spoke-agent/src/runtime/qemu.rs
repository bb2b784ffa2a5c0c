//! placeholder until the QEMU runtime lands
