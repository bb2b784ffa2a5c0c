//! Every GraphQL example in the README runs against a live hub's schema: a field, argument or
//! type the README names and the API does not have fails here, so the README cannot drift
//! from the API. (The examples' values — ids written "…", clusters that are not joined — may be
//! refused at run time; only a parse or validation error counts as a broken example.)

use std::time::Duration;

use drover_e2e::testbed::{Backend, TestHub};
use futures::StreamExt;
use serde_json::Value;

/// The README's GraphQL operations: the lines of ```graphql blocks (an operation starts at
/// column 0, its continuation lines are indented), inline code spans that are an operation, and
/// the operations quoted in shell comments.
fn examples(readme: &str) -> Vec<String> {
    let starts = |s: &str| {
        s.starts_with("{ ")
            || s.starts_with("mutation {")
            || s.starts_with("query")
            || s.starts_with("subscription {")
    };
    let mut found = Vec::new();
    let mut in_graphql = false;
    let mut in_other = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            if in_graphql || in_other {
                in_graphql = false;
                in_other = false;
            } else if line.trim() == "```graphql" {
                in_graphql = true;
            } else {
                in_other = true;
            }
            continue;
        }
        if in_graphql {
            if starts(line) {
                found.push(line.to_owned());
            } else if line.starts_with(' ') {
                if let Some(last) = found.last_mut() {
                    last.push('\n');
                    last.push_str(line);
                }
            }
            continue;
        }
        if in_other {
            if let Some(at) = line
                .find("mutation {")
                .filter(|_| line.trim_start().starts_with('#'))
            {
                found.push(line[at..].to_owned());
            }
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && starts(span) {
                found.push(span.to_owned());
            }
        }
    }
    found
}

fn broken(response: &Value) -> Option<String> {
    let errors = response["errors"].as_array()?;
    let bad: Vec<&Value> = errors
        .iter()
        .filter(|e| {
            matches!(
                e["extensions"]["code"].as_str(),
                Some("GRAPHQL_PARSE_FAILED" | "GRAPHQL_VALIDATION_FAILED")
            )
        })
        .collect();
    (!bad.is_empty()).then(|| format!("{bad:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_graphql_example_in_the_readme_fits_the_api() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the workspace root");
    let examples = examples(&readme);
    assert!(
        examples.len() >= 20,
        "the README's examples were found ({}): {examples:#?}",
        examples.len()
    );
    let h = TestHub::new(Backend::Sqlite, "readme").await.unwrap();
    let mut failures = Vec::new();
    for example in &examples {
        let response: Value = if example.starts_with("subscription") {
            // A subscription that validates waits for events; one that does not answers at once.
            let request = async_graphql::Request::new(example.as_str())
                .data(drover_e2e::testbed::test_admin());
            let mut stream = h.hub.schema.execute_stream(request);
            match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                Ok(Some(first)) => serde_json::to_value(first).unwrap(),
                _ => Value::Null,
            }
        } else {
            h.gql(example, serde_json::json!({})).await
        };
        if let Some(why) = broken(&response) {
            failures.push(format!("{example}\n  -> {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "README examples that do not fit the API:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_example_finder_finds_blocks_spans_and_shell_comments() {
    let text = "Try `{ fleet { clusters { total } } }` first.\n\n```graphql\nmutation { a(x: 1,\n  y: 2) { b } }\n{ c { d } }\n```\n\n```sh\n# hub:  mutation { e { f } }\necho `{ not graphql }`\n```\n";
    assert_eq!(
        examples(text),
        vec![
            "{ fleet { clusters { total } } }".to_owned(),
            "mutation { a(x: 1,\n  y: 2) { b } }".to_owned(),
            "{ c { d } }".to_owned(),
            "mutation { e { f } }".to_owned(),
        ]
    );
}
