//! The load generator's profiles (`ramp:A-B:Ns,...` and one rate per
//! line): a profile of rates that are numbers of requests a second, or an
//! error, never a panic (nor an allocation the size of the machine).
#![no_main]

use headroom_loadgen::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let profiles = [Profile::parse(text), Profile::from_lines(text, 60.0)];
    for profile in profiles.into_iter().flatten() {
        assert!(
            profile.rates.iter().all(|r| r.is_finite() && *r >= 0.0),
            "a rate that is not one: {:?}",
            &profile.rates[..profile.rates.len().min(8)]
        );
    }
});
