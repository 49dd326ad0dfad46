//! RFC 8291 message encryption for Web Push: the `aes128gcm` content coding
//! of RFC 8188 with keys agreed between an ephemeral key of ours and the
//! browser's `p256dh` key, mixed with its `auth` secret. On aws-lc-rs (P-256
//! ECDH, HKDF-SHA-256, AES-128-GCM), the crypto the rest of the binary links.
//!
//! One record only (a push message is at most 4096 bytes): the body is
//! `salt (16) ‖ rs (u32, 4096) ‖ idlen (1, 65) ‖ our public key (65) ‖
//! AES-128-GCM(plaintext ‖ 0x02)`.

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, KeyType, Salt};

/// The record size written in the header; the push service must accept a
/// message of this size (RFC 8030 §7.2).
pub const RECORD_SIZE: u32 = 4096;
/// Bytes of the header: salt, record size, key id length, key id.
pub const HEADER_LEN: usize = 16 + 4 + 1 + 65;
/// Bytes that encryption adds to the plaintext: the header, the padding
/// delimiter and the AEAD tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + 16;
/// Largest plaintext that fits one 4096-byte message.
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - OVERHEAD;

/// Why a message could not be encrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EceError {
    #[error("the subscription's p256dh key is not an uncompressed P-256 point")]
    BadPublicKey,
    #[error("the subscription's auth secret is not 16 bytes")]
    BadAuthSecret,
    #[error("plaintext of {0} bytes does not fit one 4096-byte push message")]
    TooLarge(usize),
    #[error("cryptographic failure")]
    Crypto,
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Result<[u8; N], EceError> {
    let mut out = [0u8; N];
    Salt::new(HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(N))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| EceError::Crypto)?;
    Ok(out)
}

/// The content-encryption key and nonce of RFC 8291 §3.4 for one message.
/// `ecdh_secret` is the shared secret of the two P-256 keys; `ua_public` is
/// the browser's key, `as_public` ours; both 65 bytes uncompressed.
pub fn derive(
    ecdh_secret: &[u8],
    auth: &[u8],
    ua_public: &[u8],
    as_public: &[u8],
    salt: &[u8; 16],
) -> Result<([u8; 16], [u8; 12]), EceError> {
    let ikm: [u8; 32] = hkdf(
        auth,
        ecdh_secret,
        &[b"WebPush: info\0", ua_public, as_public],
    )?;
    let cek: [u8; 16] = hkdf(salt, &ikm, &[b"Content-Encoding: aes128gcm\0"])?;
    let nonce: [u8; 12] = hkdf(salt, &ikm, &[b"Content-Encoding: nonce\0"])?;
    Ok((cek, nonce))
}

/// Encrypts `plaintext` for the browser whose keys are `ua_public`
/// (`p256dh`, decoded) and `auth`, with our key `as_key` and `salt` — both
/// fresh for every message ([`encrypt`]); fixed here only for the RFC's
/// test vector.
pub fn encrypt_with(
    plaintext: &[u8],
    ua_public: &[u8],
    auth: &[u8],
    as_key: &PrivateKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, EceError> {
    if ua_public.len() != 65 || ua_public[0] != 0x04 {
        return Err(EceError::BadPublicKey);
    }
    if auth.len() != 16 {
        return Err(EceError::BadAuthSecret);
    }
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EceError::TooLarge(plaintext.len()));
    }
    let as_public = as_key.compute_public_key().map_err(|_| EceError::Crypto)?;
    let as_public = as_public.as_ref();
    let (cek, nonce) = agreement::agree(
        as_key,
        UnparsedPublicKey::new(&ECDH_P256, ua_public),
        EceError::BadPublicKey,
        |secret| derive(secret, auth, ua_public, as_public, salt),
    )?;
    let mut body = Vec::with_capacity(plaintext.len() + OVERHEAD);
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(as_public.len() as u8);
    body.extend_from_slice(as_public);
    let mut record = Vec::with_capacity(plaintext.len() + 17);
    record.extend_from_slice(plaintext);
    // The last (and only) record's padding delimiter; no padding after it.
    record.push(0x02);
    let key = UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| EceError::Crypto)?;
    // Sequence number 0: the nonce is used as derived.
    LessSafeKey::new(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut record,
        )
        .map_err(|_| EceError::Crypto)?;
    body.extend_from_slice(&record);
    Ok(body)
}

/// Encrypts `plaintext` with a fresh key and salt (RFC 8291 §3).
pub fn encrypt(plaintext: &[u8], ua_public: &[u8], auth: &[u8]) -> Result<Vec<u8>, EceError> {
    let key = PrivateKey::generate(&ECDH_P256).map_err(|_| EceError::Crypto)?;
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| EceError::Crypto)?;
    encrypt_with(plaintext, ua_public, auth, &key, &salt)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap()
    }

    /// RFC 8291 §5 (Appendix A's keys): the same keys and salt must give the
    /// RFC's message byte for byte.
    #[test]
    fn the_rfc_8291_example_is_reproduced_exactly() {
        let as_key = PrivateKey::from_private_key(
            &ECDH_P256,
            &b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"),
        )
        .unwrap();
        assert_eq!(
            as_key.compute_public_key().unwrap().as_ref(),
            b64(
                "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
            )
        );
        let salt: [u8; 16] = b64("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let body = encrypt_with(
            b"When I grow up, I want to be a watermelon",
            &b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"),
            &b64("BTBZMqHH6r4Tts7J_aSIgg"),
            &as_key,
            &salt,
        )
        .unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(&body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
    }

    #[test]
    fn bad_keys_and_oversized_plaintexts_are_refused() {
        let ua = PrivateKey::generate(&ECDH_P256).unwrap();
        let ua_public = ua.compute_public_key().unwrap().as_ref().to_vec();
        let auth = [7u8; 16];
        assert_eq!(
            encrypt(b"x", &ua_public[..33], &auth),
            Err(EceError::BadPublicKey)
        );
        let mut off_curve = ua_public.clone();
        off_curve[64] ^= 1;
        assert_eq!(
            encrypt(b"x", &off_curve, &auth),
            Err(EceError::BadPublicKey)
        );
        assert_eq!(
            encrypt(b"x", &ua_public, &auth[..15]),
            Err(EceError::BadAuthSecret)
        );
        let fits = vec![b'a'; MAX_PLAINTEXT];
        assert_eq!(
            encrypt(&fits, &ua_public, &auth).unwrap().len(),
            RECORD_SIZE as usize
        );
        assert_eq!(
            encrypt(&[fits, b"a".to_vec()].concat(), &ua_public, &auth),
            Err(EceError::TooLarge(MAX_PLAINTEXT + 1))
        );
    }
}
