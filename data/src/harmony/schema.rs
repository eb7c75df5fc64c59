//! JSON schema → the TypeScript-like declarations harmony writes for function
//! tools. A port of `json_schema_to_typescript` and `template_tools_section`
//! in openai/harmony `src/encoding.rs` (v0.0.8), quirks included (the
//! indentation of nested objects, which defaults get quotes), because the
//! model was trained on exactly that text.

use crate::conversation::ToolSpec;
use crate::json::{Kind, Value};

fn is_enum(schema: &Value) -> bool {
    matches!(schema.get("enum").map(|e| &e.kind), Some(Kind::Array(a)) if !a.is_empty())
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match &v.kind {
        Kind::Array(a) => Some(a),
        _ => None,
    }
}

fn nullable(v: &Value) -> bool {
    matches!(v.get("nullable").map(|n| &n.kind), Some(Kind::Bool(true)))
}

fn with_null(v: &Value, ty: String) -> String {
    if nullable(v) && !ty.contains("null") {
        format!("{ty} | null")
    } else {
        ty
    }
}

/// `default: …` of a property: plain strings quoted raw, enum strings bare,
/// everything else as compact JSON.
fn default_comment(schema: &Value, default: &Value) -> String {
    match default.as_str() {
        Some(s) if !is_enum(schema) => format!("default: \"{s}\""),
        Some(s) => format!("default: {s}"),
        None => format!("default: {}", default.to_compact()),
    }
}

fn one_of_top_level(variants: &[Value], indent: &str) -> String {
    let mut out = String::new();
    for (i, variant) in variants.iter().enumerate() {
        if i > 0 {
            out.push('\n');
            out.push_str(&format!("{indent} | "));
        } else {
            out.push_str(&format!("\n{indent} | "));
        }
        out.push_str(&with_null(variant, to_typescript(variant, &format!("{indent}   "))));
        let mut trailing = Vec::new();
        if let Some(d) = variant.get("description").and_then(Value::as_str) {
            trailing.push(d.to_string());
        }
        if let Some(default) = variant.get("default") {
            // Unlike properties, a top-level variant's enum default is JSON.
            match default.as_str() {
                Some(s) if !is_enum(variant) => trailing.push(format!("default: \"{s}\"")),
                _ => trailing.push(format!("default: {}", default.to_compact())),
            }
        }
        if !trailing.is_empty() {
            out.push_str(&format!(" // {}", trailing.join(" ")));
        }
    }
    out
}

pub(crate) fn to_typescript(schema: &Value, indent: &str) -> String {
    if let Some(variants) = schema.get("oneOf").and_then(as_array) {
        return one_of_top_level(variants, indent);
    }
    if let Some(types) = schema.get("type").and_then(as_array) {
        let names: Vec<&str> =
            types.iter().filter_map(Value::as_str).map(|t| if t == "integer" { "number" } else { t }).collect();
        if !names.is_empty() {
            return names.join(" | ");
        }
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        return "any".to_string();
    };
    match ty {
        "object" => object(schema, indent),
        "string" => {
            let enums: Vec<String> = schema
                .get("enum")
                .and_then(as_array)
                .unwrap_or(&[])
                .iter()
                .filter_map(Value::as_str)
                .map(|s| format!("\"{s}\""))
                .collect();
            if enums.is_empty() {
                "string".to_string()
            } else {
                enums.join(" | ")
            }
        }
        "number" | "integer" => "number".to_string(),
        "boolean" => "boolean".to_string(),
        "array" => match schema.get("items") {
            Some(items) => format!("{}[]", to_typescript(items, indent)),
            None => "Array<any>".to_string(),
        },
        _ => "any".to_string(),
    }
}

fn object(schema: &Value, indent: &str) -> String {
    let mut out = String::new();
    if let Some(d) = schema.get("description").and_then(Value::as_str) {
        out.push_str(&format!("{indent}// {d}\n"));
    }
    out.push_str("{\n");
    let required: Vec<&str> =
        schema.get("required").and_then(as_array).unwrap_or(&[]).iter().filter_map(Value::as_str).collect();
    let props = match schema.get("properties").map(|p| &p.kind) {
        Some(Kind::Object(m)) => m.as_slice(),
        _ => &[],
    };
    for m in props {
        let (key, val) = (&m.key, &m.value);
        let optional = if required.contains(&key.as_str()) { "" } else { "?" };
        if let Some(t) = val.get("title").and_then(Value::as_str) {
            out.push_str(&format!("{indent}// {t}\n{indent}//\n"));
        }
        let one_of = val.get("oneOf");
        if one_of.is_none() {
            if let Some(d) = val.get("description").and_then(Value::as_str) {
                out.push_str(&format!("{indent}// {d}\n"));
            }
        }
        if let Some(examples) = val.get("examples").and_then(as_array) {
            if !examples.is_empty() {
                out.push_str(&format!("{indent}// Examples:\n"));
                for ex in examples.iter().filter_map(Value::as_str) {
                    out.push_str(&format!("{indent}// - \"{ex}\"\n"));
                }
            }
        }
        if let Some(variants) = one_of.and_then(as_array) {
            one_of_property(&mut out, key, optional, val, variants, indent);
            continue;
        }
        out.push_str(&format!("{indent}{key}{optional}: "));
        out.push_str(&with_null(val, to_typescript(val, &format!("{indent}    "))));
        out.push(',');
        if one_of.is_none() {
            if let Some(default) = val.get("default") {
                out.push_str(&format!(" // {}", default_comment(val, default)));
            }
        }
        out.push('\n');
    }
    out.push_str(&format!("{indent}}}"));
    out
}

fn one_of_property(out: &mut String, key: &str, optional: &str, val: &Value, variants: &[Value], indent: &str) {
    let property_desc = val.get("description").and_then(Value::as_str);
    let first_desc = variants.first().and_then(|v| v.get("description")).and_then(Value::as_str);
    let skip_property_desc = property_desc.is_some() && property_desc == first_desc;
    let mut desc_above = false;
    if let (false, Some(d)) = (skip_property_desc, property_desc) {
        out.push_str(&format!("{indent}// {d}\n"));
        desc_above = true;
    }
    if let Some(default) = val.get("default") {
        out.push_str(&format!("{indent}// {}\n", default_comment(val, default)));
    }
    out.push_str(&format!("{indent}{key}{optional}:\n"));
    for (i, variant) in variants.iter().enumerate() {
        out.push_str(&format!("{indent} | "));
        out.push_str(&with_null(variant, to_typescript(variant, &format!("{indent}   "))));
        let mut trailing = Vec::new();
        if !(i == 0 && desc_above) {
            if let Some(d) = variant.get("description").and_then(Value::as_str) {
                if Some(d) != property_desc {
                    trailing.push(d.to_string());
                }
            }
        }
        if let Some(default) = variant.get("default") {
            trailing.push(default_comment(variant, default));
        }
        if !trailing.is_empty() {
            out.push_str(&format!(" // {}", trailing.join(" ")));
        }
        out.push('\n');
    }
    out.push_str(&format!("{indent},\n"));
}

/// The `# Tools` section of the developer message for the `functions`
/// namespace.
pub(crate) fn tools_section(tools: &[ToolSpec]) -> String {
    let mut ns = vec!["## functions\n".to_string(), "namespace functions {\n".to_string()];
    for tool in tools {
        for line in tool.description.lines() {
            ns.push(format!("// {line}"));
        }
        match &tool.parameters {
            Some(p) => ns.push(format!("type {} = (_: {}) => any;\n", tool.name, to_typescript(p, ""))),
            None => ns.push(format!("type {} = () => any;\n", tool.name)),
        }
    }
    ns.push("} // namespace functions".to_string());
    format!("# Tools\n\n{}", ns.join("\n"))
}
