//! The API's OpenAPI 3.1 description, generated from the handlers'
//! `#[utoipa::path]` attributes and the wire types' `ToSchema` derives, so
//! that it cannot drift from what the code answers. Served at
//! `/api/v1/openapi.json`; checked in CI by openapi-spec-validator and
//! Schemathesis (`tests/api-contract/`).

use std::sync::LazyLock;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ObjectBuilder, OneOfBuilder, Ref, Schema, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ResponseBuilder};
use utoipa::openapi::{RefOr, ServerBuilder};
use utoipa::{Modify, OpenApi};

use super::problem::Problem;
use super::{api, pages};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "conch API",
        version = "1",
        description = "Run one-off commands on conch agents, and move files to and from their hosts. Authenticate with `Authorization: Bearer <token>` (the admin token or a named API token). Errors are RFC 9457 problem details (`application/problem+json`).",
    ),
    paths(
        api::exec,
        api::agents,
        super::sessions::list,
        super::sessions::end,
        super::sessions::change,
        super::files::put,
        super::files::get,
        super::audit_log::read,
        super::recordings::list,
        super::recordings::file,
        super::users::list,
        super::users::add,
        super::users::set_password,
        super::users::delete,
        pages::session_info,
        api::list_tokens,
        api::create_token,
        api::revoke_token,
        api::openapi,
        pages::healthz,
        pages::readyz,
    ),
    components(
        schemas(Problem, crate::rest::FanoutResult, crate::rest::FanoutLine, crate::audit::Kind),
        responses(api::ProblemResponse)
    ),
    security(("bearer" = [])),
    modifiers(&Conch),
)]
struct ApiDoc;

/// What the derives cannot say.
struct Conch;

impl Modify for Conch {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // The derive fills in the package's (unset) licence as an empty name.
        doc.info.license = None;
        // Relative to the document's own address, wherever the server runs.
        doc.servers = Some(vec![
            ServerBuilder::new()
                .url("/")
                .description(Some("this server"))
                .build(),
        ]);
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Answers every operation can give, which their attributes leave
        // out: a foreign `Host` (421, every route), missing credentials and
        // bearer-token throttling (401, 429, every authenticated one), a
        // broken token store (500).
        components.responses.insert(
            "RetryLater".into(),
            RefOr::T(
                ResponseBuilder::new()
                    .description(
                        "Too many requests, or busy: try again after `Retry-After` seconds.",
                    )
                    .header(
                        "Retry-After",
                        HeaderBuilder::new()
                            .schema(
                                ObjectBuilder::new()
                                    .schema_type(Type::Integer)
                                    .minimum(Some(0)),
                            )
                            .description(Some("Seconds to wait."))
                            .build(),
                    )
                    .content(
                        "application/problem+json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("Problem")))
                            .build(),
                    )
                    .build(),
            ),
        );
        let problem = || RefOr::Ref(Ref::from_response_name("ProblemResponse"));
        let retry = || RefOr::Ref(Ref::from_response_name("RetryLater"));
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let answers = &mut op.responses.responses;
                answers.entry("421".into()).or_insert_with(problem);
                let authenticated = op.security.as_ref().is_none_or(|s| {
                    s.iter()
                        .any(|r| r != &utoipa::openapi::security::SecurityRequirement::default())
                });
                if authenticated {
                    answers.entry("401".into()).or_insert_with(problem);
                    answers.insert("429".into(), retry());
                }
                if answers.contains_key("503") && path.starts_with("/api/") {
                    answers.insert("503".into(), retry());
                }
                if path.starts_with("/api/v1/tokens") {
                    answers.entry("500".into()).or_insert_with(problem);
                }
            }
        }
        // A command with a `target` answers per host: one of the two
        // answers, and lines of either kind (a host's line is a line of one
        // command with `agent` added, so it may match both: `anyOf`).
        if let Some(item) = doc.paths.paths.get_mut("/api/v1/exec")
            && let Some(post) = &mut item.post
            && let Some(RefOr::T(ok)) = post.responses.responses.get_mut("200")
        {
            let refs = |a: &str, b: &str| [Ref::from_schema_name(a), Ref::from_schema_name(b)];
            if let Some(json) = ok.content.get_mut("application/json") {
                let [one, many] = refs("ExecResult", "FanoutResult");
                json.schema = Some(RefOr::T(Schema::OneOf(
                    OneOfBuilder::new().item(one).item(many).build(),
                )));
            }
            if let Some(lines) = ok.content.get_mut("application/x-ndjson") {
                let [one, many] = refs("StreamLine", "FanoutLine");
                lines.schema = Some(RefOr::T(Schema::AnyOf(
                    AnyOfBuilder::new().item(one).item(many).build(),
                )));
            }
        }
        // Exactly one of `command` and `argv`: a `oneOf` of the two
        // `required`s (a body with both matches both, so fails it too).
        if let Some(mut fields) = components.schemas.remove("ExecRequest") {
            // The encodings by name: the derive sees only a string.
            if let RefOr::T(Schema::Object(object)) = &mut fields
                && let Some(RefOr::T(Schema::Object(encoding))) =
                    object.properties.get_mut("encoding")
            {
                encoding.enum_values = Some(
                    api::ENCODINGS
                        .iter()
                        .map(|e| e.name().to_ascii_lowercase().into())
                        .collect(),
                );
            }
            let either = OneOfBuilder::new()
                .item(ObjectBuilder::new().required("command"))
                .item(ObjectBuilder::new().required("argv"));
            let request = AllOfBuilder::new()
                .item(fields)
                .item(either)
                .description(Some("Exactly one of `command` and `argv`."));
            components.schemas.insert(
                "ExecRequest".into(),
                RefOr::T(Schema::AllOf(request.build())),
            );
        }
    }
}

/// What utoipa's types cannot hold (`not`), and the selector grammar,
/// written into the JSON.
fn patch(doc: &mut serde_json::Value) {
    use serde_json::json;
    let selector = json!({
        "type": "string",
        "pattern": crate::selector::PATTERN,
        "maxLength": crate::selector::MAX_LEN,
    });
    let schemas = &mut doc["components"]["schemas"];
    if let Some(all) = schemas["ExecRequest"]["allOf"].as_array_mut() {
        all[0]["properties"]["target"] = json!({
            "allOf": [selector.clone()],
            "description": all[0]["properties"]["target"]["description"].clone(),
        });
        // One host or a target, not both; a concurrency only with a target.
        all.push(json!({"not": {"required": ["agent", "target"]}}));
        all.push(json!({"anyOf": [
            {"required": ["target"]},
            {"not": {"required": ["concurrency"]}},
        ]}));
    }
    for body in ["NewToken", "NewUser"] {
        let description = schemas[body]["properties"]["agents"]["description"].clone();
        schemas[body]["properties"]["agents"] =
            json!({"allOf": [selector.clone()], "description": description});
    }
    if let Some(params) = doc["paths"]["/api/v1/agents"]["get"]["parameters"].as_array_mut() {
        for param in params.iter_mut().filter(|p| p["name"] == "selector") {
            param["schema"] = selector.clone();
        }
    }
}

/// The document as JSON, built once.
/// The document for a server under `base` ("" or "/conch"): its `servers`
/// entry is the base path (which the spec joins with each path), so that
/// clients resolve every path under it. Made once: a process has one base.
pub(crate) fn document_under(base: &str) -> &'static str {
    if base.is_empty() {
        return document();
    }
    static UNDER: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (made_for, doc) = UNDER.get_or_init(|| {
        let mut doc: serde_json::Value =
            serde_json::from_str(document()).expect("the OpenAPI document parses");
        if let Some(servers) = doc.get_mut("servers").and_then(|s| s.as_array_mut())
            && let Some(first) = servers.first_mut()
        {
            first["url"] = serde_json::Value::String(base.to_owned());
        }
        let text = serde_json::to_string_pretty(&doc).expect("the OpenAPI document serializes");
        (base.to_owned(), text)
    });
    debug_assert_eq!(made_for, base, "one base path per process");
    doc
}

/// The document at the root.
pub(crate) fn document() -> &'static str {
    static DOC: LazyLock<String> = LazyLock::new(|| {
        let mut doc =
            serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
        patch(&mut doc);
        serde_json::to_string_pretty(&doc).expect("the OpenAPI document serializes")
    });
    &DOC
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn the_exec_request_needs_exactly_one_of_command_and_argv() {
        let doc: Value = serde_json::from_str(super::document()).unwrap();
        let request = &doc["components"]["schemas"]["ExecRequest"];
        let either = &request["allOf"][1]["oneOf"];
        assert_eq!(either[0]["required"][0], "command", "{request}");
        assert_eq!(either[1]["required"][0], "argv", "{request}");
        assert_eq!(request["allOf"][0]["additionalProperties"], false);
        let encodings = &request["allOf"][0]["properties"]["encoding"]["enum"];
        assert!(
            encodings.as_array().unwrap().contains(&"shift_jis".into()),
            "{encodings}"
        );
        // Every name listed is one the server takes.
        for name in encodings.as_array().unwrap() {
            let name = name.as_str().unwrap();
            assert!(
                encoding_rs::Encoding::for_label(name.as_bytes()).is_some(),
                "{name}"
            );
        }
        // Throttling and a foreign Host are answers of every API operation.
        for (path, method) in [("/api/v1/agents", "get"), ("/api/v1/exec", "post")] {
            let answers = &doc["paths"][path][method]["responses"];
            assert_eq!(answers["429"]["$ref"], "#/components/responses/RetryLater");
            assert_eq!(
                answers["421"]["$ref"],
                "#/components/responses/ProblemResponse"
            );
        }
        assert!(doc["paths"]["/healthz"]["get"]["responses"]["429"].is_null());
        let timeout = &request["allOf"][0]["properties"]["timeout_ms"]["maximum"];
        assert_eq!(
            timeout.as_u64(),
            Some(super::api::MAX_SAFE_INTEGER),
            "{timeout}"
        );
    }
}
