//! Types and names shared by the eBPF programs (`agent-ebpf`) and the agent's userspace.
#![no_std]
