//! The OpenAPI 3 document served at `/openapi/v3`, generated with utoipa's
//! builders from the served kinds: one path item per route, operations with
//! their parameters, responses referencing component schemas by
//! [`KindInfo::schema_name`].

use krvirt_api::KindInfo;
use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{
    Components, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder,
    Ref, RefOr, Required, ResponseBuilder,
};

use crate::http::{
    SubresourceMethod, group_version_path, implemented_subresources, subresource_group,
};

/// Name of the `Status` component (error responses).
pub const STATUS_SCHEMA: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
/// Name of the watch event component.
pub const WATCH_EVENT_SCHEMA: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent";

/// Name of the list component of a kind.
pub fn list_schema_name(kind: &KindInfo) -> String {
    format!("{}List", kind.schema_name)
}

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn schema_ref(name: &str) -> Ref {
    Ref::from_schema_name(name)
}

fn path_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(string_schema()))
        .build()
}

fn query_param(name: &str, ty: Type, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(ty)))
        .build()
}

fn list_params() -> Vec<utoipa::openapi::path::Parameter> {
    vec![
        query_param(
            "labelSelector",
            Type::String,
            "Label selector: a=b, a!=b, a in (x,y), a notin (x), a, !a; comma-joined.",
        ),
        query_param(
            "fieldSelector",
            Type::String,
            "Field selector over metadata.name, metadata.namespace, status.nodeName, status.phase.",
        ),
        query_param(
            "watch",
            Type::Boolean,
            "Stream changes as newline-delimited JSON watch events.",
        ),
        query_param(
            "resourceVersion",
            Type::String,
            "With watch: resume after this version (unset or 0: existing objects first).",
        ),
        query_param(
            "timeoutSeconds",
            Type::Integer,
            "With watch: end the stream after this many seconds.",
        ),
    ]
}

fn json_yaml_content(schema: Ref) -> Vec<(&'static str, utoipa::openapi::Content)> {
    vec![
        (
            "application/json",
            ContentBuilder::new().schema(Some(schema.clone())).build(),
        ),
        (
            "application/yaml",
            ContentBuilder::new().schema(Some(schema)).build(),
        ),
    ]
}

fn response_with(description: &str, schema: Ref) -> utoipa::openapi::Response {
    let mut b = ResponseBuilder::new().description(description);
    for (ct, c) in json_yaml_content(schema) {
        b = b.content(ct, c);
    }
    b.build()
}

fn status_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(schema_ref(STATUS_SCHEMA)))
                .build(),
        )
        .build()
}

fn body(schema: Ref) -> utoipa::openapi::request_body::RequestBody {
    let mut b = RequestBodyBuilder::new().required(Some(Required::True));
    for (ct, c) in json_yaml_content(schema) {
        b = b.content(ct, c);
    }
    b.build()
}

fn merge_patch_body() -> utoipa::openapi::request_body::RequestBody {
    RequestBodyBuilder::new()
        .required(Some(Required::True))
        .content(
            "application/merge-patch+json",
            ContentBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                .build(),
        )
        .build()
}

struct Op {
    id: String,
    summary: String,
    params: Vec<utoipa::openapi::path::Parameter>,
    tag: String,
}

impl Op {
    fn builder(&self) -> OperationBuilder {
        let mut b = OperationBuilder::new()
            .operation_id(Some(self.id.clone()))
            .summary(Some(self.summary.clone()))
            .tag(self.tag.clone());
        for p in &self.params {
            b = b.parameter(p.clone());
        }
        b.response("default", status_response("Error (a Kubernetes Status)"))
    }
}

fn tag(kind: &KindInfo) -> String {
    kind.api_version()
}

/// Paths of every route of `kind`.
fn kind_paths(kind: &KindInfo, mut paths: PathsBuilder) -> PathsBuilder {
    let base = group_version_path(kind.group, kind.version);
    let scope = if kind.namespaced { "Namespaced" } else { "" };
    let k = kind.kind;
    let obj_ref = schema_ref(kind.schema_name);
    let list_ref = schema_ref(&list_schema_name(kind));
    let ns_param = path_param("namespace", "Namespace of the object.");
    let name_param = path_param("name", &format!("Name of the {k}."));
    let (coll, obj, coll_params, obj_params) = if kind.namespaced {
        (
            format!("{base}/namespaces/{{namespace}}/{}", kind.plural),
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", kind.plural),
            vec![ns_param.clone()],
            vec![ns_param.clone(), name_param.clone()],
        )
    } else {
        (
            format!("{base}/{}", kind.plural),
            format!("{base}/{}/{{name}}", kind.plural),
            vec![],
            vec![name_param.clone()],
        )
    };
    let mut list_all_params = coll_params.clone();
    list_all_params.extend(list_params());
    let op = |id: String, summary: String, params: &[utoipa::openapi::path::Parameter]| Op {
        id,
        summary,
        params: params.to_vec(),
        tag: tag(kind),
    };

    // Collection.
    let list_op = op(
        format!("list{scope}{k}"),
        format!("List or watch objects of kind {k}"),
        &list_all_params,
    )
    .builder()
    .response("200", response_with("OK", list_ref.clone()));
    let create_op = op(
        format!("create{scope}{k}"),
        format!("Create a {k}"),
        &coll_params,
    )
    .builder()
    .request_body(Some(body(obj_ref.clone())))
    .response("201", response_with("Created", obj_ref.clone()));
    paths = paths.path(
        &coll,
        PathItemBuilder::new()
            .operation(HttpMethod::Get, list_op)
            .operation(HttpMethod::Post, create_op)
            .build(),
    );

    // All namespaces.
    if kind.namespaced {
        let params = list_params();
        let all = op(
            format!("list{k}ForAllNamespaces"),
            format!("List or watch objects of kind {k} across all namespaces"),
            &params,
        )
        .builder()
        .response("200", response_with("OK", list_ref.clone()));
        paths = paths.path(
            format!("{base}/{}", kind.plural),
            PathItemBuilder::new()
                .operation(HttpMethod::Get, all)
                .build(),
        );
    }

    // Object.
    let read = op(
        format!("read{scope}{k}"),
        format!("Read a {k}"),
        &obj_params,
    )
    .builder()
    .response("200", response_with("OK", obj_ref.clone()));
    let replace = op(
        format!("replace{scope}{k}"),
        format!("Replace a {k} (compare-and-swap on metadata.resourceVersion)"),
        &obj_params,
    )
    .builder()
    .request_body(Some(body(obj_ref.clone())))
    .response("200", response_with("OK", obj_ref.clone()));
    let patch = op(
        format!("patch{scope}{k}"),
        format!("Apply a JSON merge patch to a {k}"),
        &obj_params,
    )
    .builder()
    .request_body(Some(merge_patch_body()))
    .response("200", response_with("OK", obj_ref.clone()));
    let delete = op(
        format!("delete{scope}{k}"),
        format!("Delete a {k}"),
        &obj_params,
    )
    .builder()
    .response("200", response_with("Deleted", obj_ref.clone()))
    .response(
        "202",
        response_with("Marked for deletion (finalizers pending)", obj_ref.clone()),
    );
    paths = paths.path(
        &obj,
        PathItemBuilder::new()
            .operation(HttpMethod::Get, read)
            .operation(HttpMethod::Put, replace)
            .operation(HttpMethod::Patch, patch)
            .operation(HttpMethod::Delete, delete)
            .build(),
    );

    // Status.
    let read_s = op(
        format!("read{scope}{k}Status"),
        format!("Read the status of a {k}"),
        &obj_params,
    )
    .builder()
    .response("200", response_with("OK", obj_ref.clone()));
    let replace_s = op(
        format!("replace{scope}{k}Status"),
        format!("Replace the status of a {k}"),
        &obj_params,
    )
    .builder()
    .request_body(Some(body(obj_ref.clone())))
    .response("200", response_with("OK", obj_ref.clone()));
    let patch_s = op(
        format!("patch{scope}{k}Status"),
        format!("Apply a JSON merge patch to the status of a {k}"),
        &obj_params,
    )
    .builder()
    .request_body(Some(merge_patch_body()))
    .response("200", response_with("OK", obj_ref.clone()));
    paths = paths.path(
        format!("{obj}/status"),
        PathItemBuilder::new()
            .operation(HttpMethod::Get, read_s)
            .operation(HttpMethod::Put, replace_s)
            .operation(HttpMethod::Patch, patch_s)
            .build(),
    );

    // KubeVirt subresources.
    let subs = implemented_subresources(kind);
    if !subs.is_empty() && !kind.group.is_empty() {
        let sub_base = group_version_path(&subresource_group(kind.group), kind.version);
        let sub_obj = if kind.namespaced {
            format!(
                "{sub_base}/namespaces/{{namespace}}/{}/{{name}}",
                kind.plural
            )
        } else {
            format!("{sub_base}/{}/{{name}}", kind.plural)
        };
        for (sub, method) in subs {
            let cap = capitalize(sub);
            let mut params = obj_params.clone();
            if *sub == "consolelog" {
                params.push(query_param(
                    "follow",
                    Type::Boolean,
                    "Keep streaming new console output.",
                ));
            }
            let o = op(
                format!("v1{cap}{k}"),
                format!("{cap} subresource of a {k}"),
                &params,
            )
            .builder();
            let (http_method, o) = match method {
                SubresourceMethod::Put => (
                    HttpMethod::Put,
                    o.request_body(Some(
                        RequestBodyBuilder::new()
                            .required(Some(Required::False))
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                                    .build(),
                            )
                            .build(),
                    ))
                    .response("200", ResponseBuilder::new().description("Done").build())
                    .response("202", ResponseBuilder::new().description("Accepted").build()),
                ),
                SubresourceMethod::Get => (
                    HttpMethod::Get,
                    o.response(
                        "200",
                        ResponseBuilder::new()
                            .description("Serial console output")
                            .content(
                                "text/plain",
                                ContentBuilder::new()
                                    .schema(Some(string_schema()))
                                    .build(),
                            )
                            .build(),
                    ),
                ),
                SubresourceMethod::WebSocket => (
                    HttpMethod::Get,
                    o.description(Some(
                        "WebSocket (subprotocol plain.kubevirt.io): binary frames carry raw serial bytes both ways.",
                    ))
                    .response(
                        "101",
                        ResponseBuilder::new()
                            .description("Switching to the WebSocket protocol")
                            .build(),
                    ),
                ),
            };
            paths = paths.path(
                format!("{sub_obj}/{sub}"),
                PathItemBuilder::new().operation(http_method, o).build(),
            );
        }
    }
    paths
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Schemas for the kinds themselves, generated by krvirt-api from the
/// typed structs. Kinds it has no schema for (kinds served only in tests)
/// get a generic Kubernetes-object schema so every `$ref` resolves.
fn kind_components(kinds: &[KindInfo]) -> Components {
    let mut components = krvirt_api::openapi_components();
    for k in kinds {
        components
            .schemas
            .entry(k.schema_name.to_string())
            .or_insert_with(|| {
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some(format!("{} ({})", k.kind, k.api_version())))
                    .property("apiVersion", string_schema())
                    .property("kind", string_schema())
                    .property("metadata", ObjectBuilder::new().schema_type(Type::Object))
                    .property("spec", ObjectBuilder::new().schema_type(Type::Object))
                    .property("status", ObjectBuilder::new().schema_type(Type::Object))
                    .into()
            });
    }
    components
}

/// Schemas the server itself defines: lists, Status, WatchEvent.
fn server_components(kinds: &[KindInfo]) -> Vec<(String, RefOr<Schema>)> {
    let mut out: Vec<(String, RefOr<Schema>)> = Vec::new();
    for k in kinds {
        out.push((
            list_schema_name(k),
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some(format!("A list of {}", k.kind)))
                .property("apiVersion", string_schema())
                .property("kind", string_schema())
                .property(
                    "metadata",
                    ObjectBuilder::new()
                        .schema_type(Type::Object)
                        .property("resourceVersion", string_schema()),
                )
                .property(
                    "items",
                    ArrayBuilder::new().items(schema_ref(k.schema_name)),
                )
                .required("items")
                .into(),
        ));
    }
    let cause = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("reason", string_schema())
        .property("message", string_schema())
        .property("field", string_schema());
    out.push((
        STATUS_SCHEMA.to_string(),
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A Kubernetes Status: the body of every error response.",
            ))
            .property("apiVersion", string_schema())
            .property("kind", string_schema())
            .property("status", string_schema())
            .property("message", string_schema())
            .property("reason", string_schema())
            .property("code", ObjectBuilder::new().schema_type(Type::Integer))
            .property(
                "details",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("name", string_schema())
                    .property("group", string_schema())
                    .property("kind", string_schema())
                    .property("causes", ArrayBuilder::new().items(cause)),
            )
            .into(),
    ));
    out.push((
        WATCH_EVENT_SCHEMA.to_string(),
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "One line of a watch stream: type ADDED, MODIFIED, DELETED or ERROR (object is then a Status).",
            ))
            .property("type", string_schema())
            .property("object", ObjectBuilder::new().schema_type(Type::Object))
            .required("type")
            .required("object")
            .into(),
    ));
    out
}

/// The whole document for `kinds`.
pub fn document(kinds: &[KindInfo]) -> OpenApi {
    let mut paths = PathsBuilder::new();
    for k in kinds {
        paths = kind_paths(k, paths);
    }
    let mut components = kind_components(kinds);
    for (name, schema) in server_components(kinds) {
        components.schemas.entry(name).or_insert(schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("krvirt")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "KubeVirt-compatible virtualization API (Kubernetes-style REST).",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}
