//! Unit tests of request parsing and execution.
