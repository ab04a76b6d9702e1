//! Bearer tokens for what changes state: the admin listener's POSTs (`admin_token_file`
//! or `SWITCHYARD_ADMIN_TOKEN`) and `POST /v1/feedback` (`feedback_token_file`).
//!
//! The token is compared in constant time (`subtle`), so how long a refusal takes says
//! nothing of how much of a guess was right; it is never logged, and `Debug` hides it.
//! A token is a shared handle: the binary re-reads its file at each reload (a rotated
//! Kubernetes Secret) and [`Token::rotate`] swaps the secret for every holder at once;
//! a request is checked against the old or the new one, whole.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderMap, AUTHORIZATION};
use subtle::ConstantTimeEq;

/// A secret a request must present as `Authorization: Bearer <token>`. Clones share it.
#[derive(Clone)]
pub struct Token(Arc<ArcSwap<Box<[u8]>>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A token from a file's or a variable's contents, surrounding whitespace (the
    /// file's last newline) removed; `None` when nothing is left.
    pub fn new(text: &str) -> Option<Token> {
        let t = text.trim();
        (!t.is_empty()).then(|| Token(Arc::new(ArcSwap::from_pointee(t.as_bytes().into()))))
    }

    /// Makes `next`'s secret this token's, for every clone of it.
    pub fn rotate(&self, next: &Token) {
        self.0.store(next.0.load_full());
    }

    /// True when `headers` carry `Authorization: Bearer <this token>`.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let Some(given) = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| value[7..].trim_ascii())
        else {
            return false;
        };
        // `ct_eq` on slices of different lengths is false at once: the length of the
        // token is not the secret, its bytes are.
        bool::from(given.ct_eq(&self.0.load()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_allowed() {
        let t = Token::new(" s3cret-token\n").unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, v.parse().unwrap());
            t.allows(&h)
        };
        assert!(with("Bearer s3cret-token"));
        assert!(with("bearer s3cret-token"));
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Basic s3cret-token",
            "s3cret-token",
            "Bearer ",
        ] {
            assert!(!with(wrong), "{wrong}");
        }
        assert!(!t.allows(&HeaderMap::new()));
        assert!(Token::new(" \n").is_none());
        assert_eq!(format!("{t:?}"), "Token(…)");
        // A rotation reaches every clone; the old secret is refused from then on.
        let held = t.clone();
        t.rotate(&Token::new("n3w").unwrap());
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer n3w".parse().unwrap());
        assert!(held.allows(&h));
        h.insert(AUTHORIZATION, "Bearer s3cret-token".parse().unwrap());
        assert!(!held.allows(&h));
    }
}
