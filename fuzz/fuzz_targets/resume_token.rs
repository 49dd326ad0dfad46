//! The resume-token parser: any text is refused or accepted without a
//! panic, and only a token this key signed is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_broker::session::token::{ResumeClaims, ResumeKeys};

fuzz_target!(|data: &[u8]| {
    let keys = ResumeKeys::new(Some(b"fuzz-resume-secret-0123456789".to_vec()));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(claims) = keys.verify(text) {
        // Accepted: it must be what signing those claims gives.
        assert_eq!(keys.sign(&claims), text);
    }
    // A token signed here, cut or extended by the input, is refused.
    let signed = keys.sign(&ResumeClaims {
        session: "s".into(),
        user: text.chars().take(64).collect(),
        nonce: data.len() as u64,
    });
    let tampered = format!("{signed}{text}");
    if !text.is_empty() {
        assert!(keys.verify(&tampered).is_none());
    }
});
