#![no_main]
//! Fuzz target `config`: the body lives in `fuzz/targets_common.rs`, shared with the corpus
//! replay in `tests/fuzz_corpus.rs`.

use libfuzzer_sys::fuzz_target;

#[path = "../targets_common.rs"]
mod targets;

fuzz_target!(|data: &[u8]| targets::config(data));
