//! What vouches for a request's identity ([`Proof`]): the kernel (the caller is the pod the token
//! names), the token's signature (one of the cluster's keys), or EKS Auth (it accepted the token).
//! A token's claims decide nothing unless one of them holds: the audit log says which did.

use serde::ser::{Serialize, SerializeSeq as _, Serializer};

bitflags::bitflags! {
    /// The proofs of a request's identity; empty when nothing vouches for the token's claims.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Proof: u8 {
        /// The kernel attributed the connection to the pod the token names (binding matched).
        const KERNEL = 1;
        /// The token verifies with one of the cluster's signing keys.
        const SIGNATURE = 1 << 1;
        /// EKS Auth accepted the token (credentials were issued or renewed with it).
        const EKS_AUTH = 1 << 2;
    }
}

impl Proof {
    /// Whether the token's own claims are proven (by signature or EKS Auth), not only the caller.
    pub fn token_verified(self) -> bool {
        self.intersects(Proof::SIGNATURE | Proof::EKS_AUTH)
    }

    /// The names the audit log writes: `kernel`, `signature`, `eks-auth`.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        self.iter().map(|p| match p {
            Proof::KERNEL => "kernel",
            Proof::SIGNATURE => "signature",
            _ => "eks-auth",
        })
    }
}

/// A list of names, `[]` when nothing vouches.
impl Serialize for Proof {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.iter().count()))?;
        for name in self.names() {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_serialize_as_a_list_of_names() {
        let json = |p: Proof| serde_json::to_string(&p).unwrap();
        assert_eq!(json(Proof::empty()), "[]");
        assert_eq!(
            json(Proof::KERNEL | Proof::SIGNATURE | Proof::EKS_AUTH),
            r#"["kernel","signature","eks-auth"]"#
        );
        assert_eq!(json(Proof::EKS_AUTH), r#"["eks-auth"]"#);
        assert!(!Proof::KERNEL.token_verified());
        assert!((Proof::KERNEL | Proof::SIGNATURE).token_verified());
    }
}
