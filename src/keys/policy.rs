//! Governance policy from `[policy]`: who may get what kind of key. Enforced at create,
//! update and rotate, by the CLI and the control plane alike.

use crate::config::{parse_duration, Config, ConfigError};
use crate::keys::record::KeyRecord;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("policy requires an owner (--owner)")]
    OwnerRequired,
    #[error("policy requires an expiry (--expires-in)")]
    ExpiryRequired,
    #[error("expiry is {requested_days} days away; policy allows at most {max_days} days (policy.max_ttl)")]
    TtlTooLong { requested_days: i64, max_days: i64 },
    #[error("scope {scope:?} is not allowed for env {env:?} (policy.allowed_scopes.{env})")]
    ScopeNotAllowed { scope: String, env: String },
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub max_ttl_secs: Option<i64>,
    pub require_owner: bool,
    pub require_expiry: bool,
    pub allowed_scopes: BTreeMap<String, BTreeSet<String>>,
}

impl Policy {
    pub fn from_config(c: &Config) -> Result<Policy, ConfigError> {
        let p = &c.policy;
        let max_ttl_secs = p
            .max_ttl
            .as_deref()
            .map(|s| {
                parse_duration(s)
                    .map(|d| d.as_secs() as i64)
                    .map_err(|m| c.invalid("policy.max_ttl", m))
            })
            .transpose()?;
        for env in p.allowed_scopes.keys() {
            if !c.keys.envs.contains(env) {
                return Err(c.invalid(
                    format!("policy.allowed_scopes.{env}"),
                    "names an env not in keys.envs",
                ));
            }
        }
        Ok(Policy {
            max_ttl_secs,
            require_owner: p.require_owner,
            require_expiry: p.require_expiry,
            allowed_scopes: p
                .allowed_scopes
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
        })
    }

    /// Check a record about to be written, at `now`.
    pub fn check(&self, r: &KeyRecord, now: i64) -> Result<(), PolicyError> {
        if self.require_owner && r.owner.trim().is_empty() {
            return Err(PolicyError::OwnerRequired);
        }
        // Canary keys are never valid for requests, so lifetime rules do not apply to them.
        if !r.canary {
            match (r.expires_at, self.max_ttl_secs) {
                (None, Some(_)) if self.require_expiry => return Err(PolicyError::ExpiryRequired),
                (None, None) if self.require_expiry => return Err(PolicyError::ExpiryRequired),
                (Some(exp), Some(max)) if exp - now > max => {
                    return Err(PolicyError::TtlTooLong {
                        requested_days: (exp - now) / 86_400,
                        max_days: max / 86_400,
                    })
                }
                _ => {}
            }
        }
        if let Some(allowed) = self.allowed_scopes.get(&r.env) {
            if let Some(bad) = r.scopes.iter().find(|s| !allowed.contains(*s)) {
                return Err(PolicyError::ScopeNotAllowed {
                    scope: bad.clone(),
                    env: r.env.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether an existing record's lifetime exceeds policy (governance gauge).
    pub fn ttl_exceeded(&self, r: &KeyRecord) -> bool {
        self.lifetime_exceeded(r.expires_at, r.created_at, r.canary)
    }

    /// The same rule over the fields the gateway's compact table keeps.
    pub fn lifetime_exceeded(
        &self,
        expires_at: Option<i64>,
        created_at: i64,
        canary: bool,
    ) -> bool {
        match (self.max_ttl_secs, expires_at) {
            (Some(max), Some(exp)) => exp - created_at > max,
            (Some(_), None) => !canary,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    #[test]
    fn each_rule() {
        let p = Policy {
            max_ttl_secs: Some(10 * 86_400),
            require_owner: true,
            require_expiry: true,
            allowed_scopes: [("live".to_owned(), ["invoices:read".to_owned()].into())].into(),
        };
        let mut r = sample("key_a", Digest([0; 32]));
        r.expires_at = Some(5 * 86_400);
        assert_eq!(p.check(&r, 0), Ok(()));
        r.owner.clear();
        assert_eq!(p.check(&r, 0), Err(PolicyError::OwnerRequired));
        r.owner = "o".into();
        r.expires_at = None;
        assert_eq!(p.check(&r, 0), Err(PolicyError::ExpiryRequired));
        r.expires_at = Some(11 * 86_400);
        assert!(matches!(
            p.check(&r, 0),
            Err(PolicyError::TtlTooLong { max_days: 10, .. })
        ));
        r.expires_at = Some(86_400);
        r.scopes.push("admin".into());
        assert!(matches!(
            p.check(&r, 0),
            Err(PolicyError::ScopeNotAllowed { .. })
        ));
        r.env = "test".into();
        assert_eq!(p.check(&r, 0), Ok(()));
    }
}
