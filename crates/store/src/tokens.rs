//! Bearer tokens and secrets: generation from the OS-seeded CSPRNG and the one-way hash under
//! which tokens are stored. Plaintext tokens never reach the database.

use sha2::{Digest, Sha256};

/// A fresh token: `prefix` followed by 40 random hex characters (160 bits).
pub(crate) fn generate(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 20]>()))
}

/// A fresh 64-hex-character (256-bit) secret.
pub(crate) fn generate_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The stored form of a token: its sha256, lower-case hex.
pub(crate) fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_prefix_and_forty_hex_characters() {
        let token = generate("hrd_");
        let rest = token.strip_prefix("hrd_").unwrap_or_default();
        assert_eq!(rest.len(), 40);
        assert!(rest.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(generate("hrd_"), token);
        assert_eq!(generate_secret().len(), 64);
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
