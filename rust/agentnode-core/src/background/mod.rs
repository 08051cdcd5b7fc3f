//! Work kept off a task's start path: things a start needs made ahead of time ([`ahead`]),
//! cleanup nobody should wait for done later ([`later`]), and the gate that holds both back
//! while starts are in flight ([`quiet`]).

pub mod ahead;
pub mod later;
pub mod quiet;
