//! Chunk store.
#![forbid(unsafe_code)]
