//! `Notification::from_json` and `from_json_with_limits` (lenient) on arbitrary bytes: the default
//! limits accept nothing the lenient ones refuse, and whatever decodes round-trips through `to_json`.
#![no_main]

use dualstream_core::{Limits, Notification};
use libfuzzer_sys::fuzz_target;

fn round_trip(n: &Notification, limits: &Limits) {
    let json = n.to_json();
    let back = Notification::from_json_with_limits(&json, limits).expect("a decoded notification's JSON decodes");
    assert_eq!(&back, n);
}

fuzz_target!(|data: &[u8]| {
    let strict = Notification::from_json(data).ok();
    let lenient = Notification::from_json_with_limits(data, &Limits::lenient()).ok();
    if let Some(n) = &strict {
        assert_eq!(lenient.as_ref(), Some(n), "the lenient limits accept what the default limits accept");
        round_trip(n, &Limits::default());
    }
    if let Some(n) = &lenient {
        round_trip(n, &Limits::lenient());
    }
});
