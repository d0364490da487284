#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shop_fuzz_targets::as_of_history(data));
