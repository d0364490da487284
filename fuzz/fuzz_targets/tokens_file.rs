#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shop_fuzz_targets::tokens_file(data));
