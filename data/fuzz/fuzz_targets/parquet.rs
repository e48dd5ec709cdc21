#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| dpo_data_fuzz::read("parquet", bytes));
