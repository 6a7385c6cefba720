//! Bearer-token authentication: every non-public route needs `Authorization: Bearer <token>`,
//! a tenant's or an ops token. The principal is put in the request's extensions for handlers
//! and the idempotency layer; handlers read it with [`Caller`].

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use herald_core::TenantId;
use herald_store::tenants::{self, Principal};

use crate::{ApiError, AppState};

/// Refuses a request without a valid bearer token (401); otherwise records who sent it.
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "missing Authorization header; send `Authorization: Bearer <token>`",
        ))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(ApiError::Unauthorized(
            "Authorization header must be `Bearer <token>`",
        ))?;
    let principal = tenants::authenticate(state.pool(), token)
        .await?
        .ok_or(ApiError::Unauthorized("unknown or revoked token"))?;
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// Who sent the request (set by [`require_token`]).
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Principal);

impl Caller {
    /// The tenant whose data the caller may see: `Some` for a tenant, `None` (everyone's) for ops.
    pub fn scope(&self) -> Option<TenantId> {
        match self.0 {
            Principal::Tenant(t) => Some(t),
            Principal::Ops => None,
        }
    }

    /// The caller's tenant, or 403 for an ops token (the action needs a tenant).
    pub fn tenant(&self) -> Result<TenantId, ApiError> {
        self.scope().ok_or(ApiError::Forbidden(
            "this action needs a tenant token, not an ops token",
        ))
    }

    /// 403 unless the caller holds an ops token.
    pub fn require_ops(&self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Ops => Ok(()),
            Principal::Tenant(_) => Err(ApiError::Forbidden("this action needs an ops token")),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .copied()
            .map(Caller)
            .ok_or(ApiError::Unauthorized("missing bearer token"))
    }
}
