//! agentnode's kernel-facing core. No Python here: `agentnode-py` wraps this crate.
//!
//! Rust owns file descriptors, syscalls, cgroups and BPF objects; the Python control plane owns
//! policy, lifecycle, HTTP and configuration.

pub mod background;
pub mod bpf;
pub mod cgroup;
pub mod doctor;
pub mod egress;
pub mod exectrace;
pub mod exits;
pub mod sandbox;
pub mod sched;
pub mod sys;
pub mod tasknet;
pub mod vector;
