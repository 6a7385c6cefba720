//! The one table of routes. The router is built from it and the OpenAPI coverage test checks
//! it against `/v1/openapi.json`, so a route cannot exist without being documented.
//!
//! Paths are written as documented (`/v1/queues/{queue}:pause`). The router matches whole path
//! segments only, so a segment with an action suffix is mounted as its parameter alone
//! (`/v1/queues/{queue}`) and the handler splits the suffix off.

use axum::http::Method;

/// What a route does; the router maps each to its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    ListQueues,
    GetQueue,
    PauseQueue,
    ResumeQueue,
    Enqueue,
    EnqueueBatch,
    GetJob,
    ListDead,
    RetryDead,
    DiscardDead,
    ListWorkers,
    GetAllowedHosts,
    PutAllowedHosts,
    ImportProfiles,
    ProfileStats,
    StartDaily,
    ListCampaigns,
    GetCampaign,
    CampaignEvents,
    ResumeCampaign,
    Cleanup,
    CreateCallUser,
    CreateCallAgent,
    RemoveCallAgent,
    ImportContacts,
    DeleteContact,
    PutVoiceProvider,
    CreateCallCampaign,
    UploadCallCampaign,
    CallCampaignTemplate,
    ListCallCampaigns,
    GetCallCampaign,
    UpdateCallCampaign,
    CallCampaignStats,
    ListCampaignCalls,
    GetCall,
    PauseCallCampaign,
    ResumeCallCampaign,
    CancelCallCampaign,
    DeleteCallCampaign,
    VoiceWebhook,
    CreateTemplate,
    TemplateSampleCsv,
    PutWhatsAppProvider,
    CreateMessageCampaign,
    GetMessageCampaign,
    MessageCampaignStats,
    SendMessageCampaign,
    PauseMessageCampaign,
    ResumeMessageCampaign,
    StopMessageCampaign,
    RetryFailedMessages,
    FailedMessagesCsv,
    WhatsAppWebhookVerify,
    WhatsAppWebhook,
    CreateSequence,
    ListSequences,
    GetSequence,
    SequenceStats,
    AddSequenceLeads,
    StartSequence,
    PauseSequence,
    StopSequence,
    SequenceLead,
    SequenceWebhook,
    LoadLeadPool,
    GetLeadPool,
    PutEmailProvider,
    PutLinkedinProvider,
    PutInstagramProvider,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (probes, metrics, the API document).
    Public,
    /// A tenant or an ops token; the handler decides what each may do.
    Token,
}

#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub op: Op,
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, op: Op, access: Access) -> Route {
    Route {
        method,
        path,
        op,
        access,
    }
}

use Access::{Public, Token};

pub static ROUTES: &[Route] = &[
    route("GET", "/healthz", Op::Healthz, Public),
    route("GET", "/readyz", Op::Readyz, Public),
    route("GET", "/metrics", Op::Metrics, Public),
    route("GET", "/v1/openapi.json", Op::OpenApi, Public),
    route("GET", "/v1/queues", Op::ListQueues, Token),
    route("GET", "/v1/queues/{queue}", Op::GetQueue, Token),
    route("POST", "/v1/queues/{queue}:pause", Op::PauseQueue, Token),
    route("POST", "/v1/queues/{queue}:resume", Op::ResumeQueue, Token),
    route("POST", "/v1/queues/{queue}/jobs", Op::Enqueue, Token),
    route(
        "POST",
        "/v1/queues/{queue}/jobs:batch",
        Op::EnqueueBatch,
        Token,
    ),
    route("GET", "/v1/queues/{queue}/jobs/{id}", Op::GetJob, Token),
    route("GET", "/v1/queues/{queue}/dead", Op::ListDead, Token),
    route(
        "POST",
        "/v1/queues/{queue}/dead/{id}:retry",
        Op::RetryDead,
        Token,
    ),
    route(
        "DELETE",
        "/v1/queues/{queue}/dead/{id}",
        Op::DiscardDead,
        Token,
    ),
    route("GET", "/v1/workers", Op::ListWorkers, Token),
    route(
        "GET",
        "/v1/tenant/allowed-hosts",
        Op::GetAllowedHosts,
        Token,
    ),
    route(
        "PUT",
        "/v1/tenant/allowed-hosts",
        Op::PutAllowedHosts,
        Token,
    ),
    route("POST", "/v1/profiles", Op::ImportProfiles, Token),
    route("GET", "/v1/profiles/stats", Op::ProfileStats, Token),
    route("POST", "/v1/campaigns/daily", Op::StartDaily, Token),
    route("GET", "/v1/campaigns", Op::ListCampaigns, Token),
    route("GET", "/v1/campaigns/{id}", Op::GetCampaign, Token),
    route(
        "GET",
        "/v1/campaigns/{id}/events",
        Op::CampaignEvents,
        Token,
    ),
    route(
        "POST",
        "/v1/campaigns/{id}/resume",
        Op::ResumeCampaign,
        Token,
    ),
    route("POST", "/v1/cleanup", Op::Cleanup, Token),
    route("POST", "/v1/users", Op::CreateCallUser, Token),
    route("POST", "/v1/agents", Op::CreateCallAgent, Token),
    route("DELETE", "/v1/agents/{id}", Op::RemoveCallAgent, Token),
    route("POST", "/v1/contacts", Op::ImportContacts, Token),
    route("DELETE", "/v1/contacts/{id}", Op::DeleteContact, Token),
    route("PUT", "/v1/providers/voice", Op::PutVoiceProvider, Token),
    route("POST", "/v1/call-campaigns", Op::CreateCallCampaign, Token),
    route(
        "POST",
        "/v1/call-campaigns:upload",
        Op::UploadCallCampaign,
        Token,
    ),
    route(
        "GET",
        "/v1/call-campaigns/templates/{file}",
        Op::CallCampaignTemplate,
        Token,
    ),
    route("GET", "/v1/call-campaigns", Op::ListCallCampaigns, Token),
    route("GET", "/v1/call-campaigns/{id}", Op::GetCallCampaign, Token),
    route(
        "PATCH",
        "/v1/call-campaigns/{id}",
        Op::UpdateCallCampaign,
        Token,
    ),
    route(
        "GET",
        "/v1/call-campaigns/{id}/stats",
        Op::CallCampaignStats,
        Token,
    ),
    route(
        "GET",
        "/v1/call-campaigns/{id}/calls",
        Op::ListCampaignCalls,
        Token,
    ),
    route("GET", "/v1/calls/{id}", Op::GetCall, Token),
    route(
        "POST",
        "/v1/call-campaigns/{id}:pause",
        Op::PauseCallCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/call-campaigns/{id}:resume",
        Op::ResumeCallCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/call-campaigns/{id}:cancel",
        Op::CancelCallCampaign,
        Token,
    ),
    route(
        "DELETE",
        "/v1/call-campaigns/{id}",
        Op::DeleteCallCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/webhooks/voice/{tenant_id}",
        Op::VoiceWebhook,
        Public,
    ),
    route("POST", "/v1/templates", Op::CreateTemplate, Token),
    route(
        "GET",
        "/v1/templates/{id}/sample.csv",
        Op::TemplateSampleCsv,
        Token,
    ),
    route(
        "PUT",
        "/v1/providers/whatsapp",
        Op::PutWhatsAppProvider,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns",
        Op::CreateMessageCampaign,
        Token,
    ),
    route(
        "GET",
        "/v1/message-campaigns/{id}",
        Op::GetMessageCampaign,
        Token,
    ),
    route(
        "GET",
        "/v1/message-campaigns/{id}/stats",
        Op::MessageCampaignStats,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns/{id}/send",
        Op::SendMessageCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns/{id}/pause",
        Op::PauseMessageCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns/{id}/resume",
        Op::ResumeMessageCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns/{id}/stop",
        Op::StopMessageCampaign,
        Token,
    ),
    route(
        "POST",
        "/v1/message-campaigns/{id}/retry-failed",
        Op::RetryFailedMessages,
        Token,
    ),
    route(
        "GET",
        "/v1/message-campaigns/{id}/failed.csv",
        Op::FailedMessagesCsv,
        Token,
    ),
    route(
        "GET",
        "/v1/webhooks/whatsapp/{tenant_id}",
        Op::WhatsAppWebhookVerify,
        Public,
    ),
    route(
        "POST",
        "/v1/webhooks/whatsapp/{tenant_id}",
        Op::WhatsAppWebhook,
        Public,
    ),
    route("POST", "/v1/sequences", Op::CreateSequence, Token),
    route("GET", "/v1/sequences", Op::ListSequences, Token),
    route("GET", "/v1/sequences/{id}", Op::GetSequence, Token),
    route("GET", "/v1/sequences/{id}/stats", Op::SequenceStats, Token),
    route(
        "POST",
        "/v1/sequences/{id}/leads",
        Op::AddSequenceLeads,
        Token,
    ),
    route("POST", "/v1/sequences/{id}/start", Op::StartSequence, Token),
    route("POST", "/v1/sequences/{id}/pause", Op::PauseSequence, Token),
    route("POST", "/v1/sequences/{id}/stop", Op::StopSequence, Token),
    route(
        "GET",
        "/v1/sequences/{id}/leads/{lead_id}",
        Op::SequenceLead,
        Token,
    ),
    route(
        "POST",
        "/v1/webhooks/sequences/{tenant_id}",
        Op::SequenceWebhook,
        Public,
    ),
    route(
        "POST",
        "/v1/lead-pools/{name}/people",
        Op::LoadLeadPool,
        Token,
    ),
    route("GET", "/v1/lead-pools/{name}", Op::GetLeadPool, Token),
    route("PUT", "/v1/providers/email", Op::PutEmailProvider, Token),
    route(
        "PUT",
        "/v1/providers/linkedin",
        Op::PutLinkedinProvider,
        Token,
    ),
    route(
        "PUT",
        "/v1/providers/instagram",
        Op::PutInstagramProvider,
        Token,
    ),
];

impl Route {
    pub fn method(&self) -> Method {
        Method::from_bytes(self.method.as_bytes()).unwrap_or(Method::GET)
    }

    /// The path the router mounts: every `{param}:action` segment becomes `{param}`.
    pub fn mount_path(&self) -> String {
        self.path
            .split('/')
            .map(|segment| match segment.find("}:") {
                Some(end) if segment.starts_with('{') => &segment[..=end],
                _ => segment,
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Splits `name:action` into its parts; `None` without an action suffix.
pub fn split_action(segment: &str) -> Option<(&str, &str)> {
    segment.rsplit_once(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_segments_mount_as_their_parameter() {
        let mounts: Vec<String> = ROUTES.iter().map(Route::mount_path).collect();
        assert!(mounts.contains(&"/v1/queues/{queue}".to_owned()));
        assert!(mounts.contains(&"/v1/queues/{queue}/dead/{id}".to_owned()));
        assert!(mounts.contains(&"/v1/queues/{queue}/jobs:batch".to_owned()));
        for r in ROUTES {
            assert_eq!(r.method().as_str(), r.method);
        }
    }
}
