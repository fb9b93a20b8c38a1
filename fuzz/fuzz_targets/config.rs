//! The configuration loader on any text: a configuration that validates,
//! or a clear error, never a panic.
#![no_main]

use headroom_shared::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        assert!(config.validate().is_ok(), "loaded but does not validate");
    }
});
