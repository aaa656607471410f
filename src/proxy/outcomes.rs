//! `POST /v1/outcomes` on the main listener: an agent reports work done, with the same
//! virtual key it calls providers with. Answers are in the OpenAI error shape (the path
//! belongs to no provider), and a refused call changes nothing (see [`crate::outcomes`]).

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use super::error::{error_response, ProxyError, REQUEST_ID_HEADER};
use super::{AppState, Live, RequestMeta, ResponseBody};
use crate::outcomes::{record_outcome, Origin, Outcome, MAX_BODY_BYTES};
use crate::providers::ProviderKind;

/// The path the proxy keeps for itself.
pub const PATH: &str = "/v1/outcomes";

pub async fn handle(
    state: &AppState,
    live: &Live,
    req: Request<Incoming>,
    meta: &RequestMeta,
) -> Response<ResponseBody> {
    let agent = live.identities.identify(req.headers());
    let agent_label = agent.as_ref().map_or("unknown", |a| &*a.id);
    let refuse = |reason: &'static str| {
        state
            .metrics
            .rejections
            .with_label_values(&[agent_label, reason])
            .inc();
        tracing::info!(
            target: "tokenwarden::access",
            request_id = meta.request_id.to_str().unwrap_or_default(),
            agent = agent_label,
            client = %meta.client_addr,
            method = %meta.method,
            path = &*meta.path,
            reason,
            "outcome refused"
        );
    };
    if req.method() != Method::POST {
        refuse("method_not_allowed");
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            None,
            "tokenwarden: outcomes are recorded with POST",
            &meta.request_id,
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let Some(agent) = agent.clone() else {
        refuse("unauthorized");
        return error_response(
            ProviderKind::OpenAi,
            &ProxyError::Unauthorized,
            &meta.request_id,
        );
    };

    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let error = if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::BodyTooLarge {
                    limit: MAX_BODY_BYTES as u64,
                }
            } else {
                ProxyError::BodyRead
            };
            refuse(error.reason());
            return error_response(ProviderKind::OpenAi, &error, &meta.request_id);
        }
    };
    let origin = Origin {
        request_id: Some(meta.request_id.clone()),
        method: meta.method.as_str().to_owned(),
        path: meta.path.to_string(),
        client: Some(meta.client_addr),
        by: None,
    };
    let recorded =
        Outcome::from_json(&body).and_then(|o| record_outcome(state, &agent.id, o, origin));
    match recorded {
        Ok(recorded) => {
            tracing::info!(
                target: "tokenwarden::access",
                request_id = meta.request_id.to_str().unwrap_or_default(),
                agent = &*agent.id,
                client = %meta.client_addr,
                kind = recorded.kind,
                count = recorded.count,
                "outcome recorded"
            );
            let body = serde_json::json!({ "recorded": recorded }).to_string();
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *response.status_mut() = StatusCode::CREATED;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(REQUEST_ID_HEADER, meta.request_id.clone());
            response
        }
        Err(e) => {
            refuse(e.reason());
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = format!("tokenwarden: {e}");
            error(status, e.reason(), e.param(), &message, &meta.request_id)
        }
    }
}

/// An OpenAI-shaped error whose `code` names the refusal and `param` the field at fault.
fn error(
    status: StatusCode,
    code: &str,
    param: Option<&str>,
    message: &str,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    });
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    response
}
