//! Static checks of the n8n integration kit in `examples/n8n/`: each example workflow's
//! MongoDB Insert node must write to the staging collection and under the field names that
//! `examples/perfagg.toml` (which states perfagg's defaults) reads. Pure file parsing, with no
//! server and no n8n; `scripts/n8n-e2e` runs the same workflows in a real n8n.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Maximum length of a workflow id that `n8n execute --id` accepts (n8n 1.123.81).
const MAX_N8N_WORKFLOW_ID_LENGTH: usize = 16;
const MONGODB_NODE_TYPE: &str = "n8n-nodes-base.mongoDb";

fn project_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_json(relative: &str) -> Value {
    let path = project_path(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid JSON: {error}", path.display()))
}

fn example_config() -> toml::Table {
    let path = project_path("examples/perfagg.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    toml::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid TOML: {error}", path.display()))
}

fn config_string<'a>(config: &'a toml::Table, table: &str, key: &str) -> &'a str {
    config[table][key]
        .as_str()
        .unwrap_or_else(|| panic!("examples/perfagg.toml: {table}.{key} is not a string"))
}

/// Reads `[fields.<source>]` as (logical field, accepted names) in file order. A key takes one
/// name or a list of names, as perfagg's configuration allows.
fn accepted_names(config: &toml::Table, source: &str) -> Vec<(String, Vec<String>)> {
    let table = config["fields"][source]
        .as_table()
        .unwrap_or_else(|| panic!("examples/perfagg.toml: fields.{source} is not a table"));
    table
        .iter()
        .map(|(key, value)| {
            let names = match value {
                toml::Value::String(name) => vec![name.clone()],
                toml::Value::Array(list) => list
                    .iter()
                    .map(|name| {
                        name.as_str()
                            .unwrap_or_else(|| {
                                panic!("fields.{source}.{key}: {name} is not a string")
                            })
                            .to_string()
                    })
                    .collect(),
                other => panic!("fields.{source}.{key}: {other} is neither a string nor a list"),
            };
            assert!(!names.is_empty(), "fields.{source}.{key} lists no name");
            (key.clone(), names)
        })
        .collect()
}

/// Splits a comma-separated list the way n8n's MongoDB node does: trimmed, empty parts dropped.
fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

fn nodes(workflow: &Value) -> &Vec<Value> {
    workflow["nodes"]
        .as_array()
        .expect("workflow has a nodes array")
}

fn mongodb_node(workflow: &Value) -> &Value {
    let matches: Vec<&Value> = nodes(workflow)
        .iter()
        .filter(|node| node["type"] == MONGODB_NODE_TYPE)
        .collect();
    assert_eq!(matches.len(), 1, "{}: MongoDB nodes", workflow["name"]);
    matches[0]
}

/// Collects the names of all nodes that some connection leads to.
fn connected_targets(workflow: &Value) -> BTreeSet<String> {
    let connections = workflow["connections"]
        .as_object()
        .expect("connections object");
    connections
        .values()
        .flat_map(|outputs| outputs["main"].as_array().cloned().unwrap_or_default())
        .flat_map(|branch| branch.as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["node"].as_str().map(str::to_string))
        .collect()
}

/// Checks one example workflow against the configuration of `source` (`metrics` or
/// `surveys`).
fn check_workflow(file: &str, source: &str) {
    let workflow = read_json(file);
    let config = example_config();
    let node = mongodb_node(&workflow);
    let parameters = &node["parameters"];

    let id = workflow["id"].as_str().expect("workflow id is a string");
    assert!(
        !id.is_empty() && id.len() <= MAX_N8N_WORKFLOW_ID_LENGTH,
        "{file}: workflow id {id:?} must have 1 to {MAX_N8N_WORKFLOW_ID_LENGTH} characters for `n8n execute --id`"
    );
    assert_eq!(
        parameters["operation"], "insert",
        "{file}: MongoDB node operation"
    );
    assert_eq!(
        parameters["collection"].as_str(),
        Some(config_string(&config, "collections", source)),
        "{file}: MongoDB node collection"
    );

    let node_name = node["name"].as_str().expect("node name");
    assert!(
        connected_targets(&workflow).contains(node_name),
        "{file}: no connection leads to the MongoDB node {node_name:?}"
    );

    // The Fields list names exactly one accepted name per logical field, the first (default)
    // one, so nothing the node writes is ignored and no field perfagg reads is left out.
    let fields = split_list(
        parameters["fields"]
            .as_str()
            .expect("Fields list is a string"),
    );
    let unique: BTreeSet<&String> = fields.iter().collect();
    assert_eq!(
        unique.len(),
        fields.len(),
        "{file}: Fields list {fields:?} repeats a name"
    );
    let accepted = accepted_names(&config, source);
    let default_names: BTreeSet<&String> = accepted.iter().map(|(_, names)| &names[0]).collect();
    assert_eq!(
        unique, default_names,
        "{file}: Fields list against fields.{source} defaults"
    );

    // Date Fields may only name the date field, which perfagg reads as a BSON date.
    let date_fields = parameters["options"]["dateFields"].as_str().unwrap_or("");
    let date_names = &accepted
        .iter()
        .find(|(key, _)| key == "date")
        .expect("fields table has a date key")
        .1;
    for name in split_list(date_fields) {
        assert!(
            date_names.contains(&name),
            "{file}: Date Fields names {name:?}, which is not an accepted date field {date_names:?}"
        );
        assert!(
            fields.contains(&name),
            "{file}: Date Fields names {name:?}, which is not in the Fields list"
        );
    }

    let credential_template = read_json("examples/n8n/mongodb-credential.json");
    let credential = &node["credentials"]["mongoDb"];
    assert_eq!(
        credential["id"], credential_template[0]["id"],
        "{file}: credential id"
    );
    assert_eq!(
        credential["name"], credential_template[0]["name"],
        "{file}: credential name"
    );
}

#[test]
fn metrics_workflow_matches_config() {
    check_workflow("examples/n8n/calculate-metrics.json", "metrics");
}

#[test]
fn survey_workflow_matches_config() {
    check_workflow("examples/n8n/process-survey.json", "surveys");
}

#[test]
fn credential_template_is_placeholder() {
    let config = example_config();
    let template = read_json("examples/n8n/mongodb-credential.json");
    let credentials = template
        .as_array()
        .expect("n8n import:credentials needs an array");
    assert_eq!(credentials.len(), 1, "credential count");

    let credential = &credentials[0];
    assert_eq!(credential["type"], "mongoDb", "credential type");
    let id = credential["id"].as_str().expect("credential id");
    assert!(!id.is_empty(), "credential id is empty");

    let data = &credential["data"];
    assert_eq!(
        data["configurationType"], "connectionString",
        "configuration type"
    );
    let uri = data["connectionString"]
        .as_str()
        .expect("connection string");
    assert!(
        uri.contains("USER:PASSWORD@HOST"),
        "connection string {uri:?} has no placeholder"
    );
    assert_eq!(
        data["database"].as_str(),
        Some(config_string(&config, "mongodb", "database")),
        "credential database"
    );
}

#[test]
fn expected_documents_have_seed_example() {
    let expected = read_json("examples/n8n/expected-performance-data.json");
    let documents = expected["documents"].as_array().expect("documents array");
    let john = documents
        .iter()
        .find(|document| document["entity_name"] == "John Doe")
        .expect("John Doe is in the expected documents");

    assert_eq!(john["entity_type"], "dpe");
    assert_eq!(john["date"], "2025-09-25");
    assert_eq!(john["metrics"]["sct"], 2.5);
    assert_eq!(john["metrics"]["cases"], 15);
    assert_eq!(john["metrics"]["customerSatisfaction"]["csat"], 13);
    assert_eq!(john["metrics"]["customerSatisfaction"]["neutral"], 2);
    assert_eq!(john["metrics"]["customerSatisfaction"]["dsat"], 0);
    // round-half-up(100 * 13 / 15) = 87
    assert_eq!(john["metrics"]["satisfaction"], 87);
}
