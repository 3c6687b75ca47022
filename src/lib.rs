//! bt2immu: turns what bpftrace sees into a tamper-evident, verified audit trail in immudb.
//!
//! The pipeline is `source → decode → shape → spool → sink → immudb`; each stage is a module
//! with a narrow interface so it can be tested without root and without a server.

pub mod app;
pub mod cli;
pub mod decode;
pub mod error_text;
pub mod immudb;
pub mod pipeline;
pub mod readline;
pub mod record;
pub mod script;
pub mod sink;
pub mod spool;
pub mod supervisor;
