//! The XML form of Headroom's messages, for interop and for reading.
//!
//! The mapping follows the JSON form one to one, so every message type has
//! an XML form without per-type work: a field is an element of the same
//! name, a list is an element holding one `<item>` per entry, a missing
//! optional field is a missing element, and an enum variant that carries
//! data is an element named after the variant (`<action><release><server>
//! s4</server></release></action>`). Reading is type-directed: the target
//! type says whether `<count>2</count>` is a number or a string, so no type
//! hints are written.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use quick_xml::events::Event;
use quick_xml::Reader;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde::Serialize;
use serde_json::Value;

/// The element of each list entry.
const ITEM: &str = "item";
/// Nesting deeper than this is refused, so hostile input cannot exhaust the
/// stack.
const MAX_DEPTH: usize = 64;

/// Why an XML body could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlError(String);

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XmlError {}

impl de::Error for XmlError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        XmlError(msg.to_string())
    }
}

/// Writes `value` as an XML document whose root element is `root`.
///
/// # Errors
/// When the value does not serialise (a map with non-string keys).
pub fn to_string<T: Serialize>(root: &str, value: &T) -> Result<String, XmlError> {
    let value = serde_json::to_value(value).map_err(|e| XmlError(e.to_string()))?;
    let mut out = String::new();
    write_element(&mut out, root, &value);
    Ok(out)
}

fn write_element(out: &mut String, name: &str, value: &Value) {
    match value {
        Value::Null => {}
        Value::Object(fields) => {
            let _ = write!(out, "<{name}>");
            for (key, field) in fields {
                write_element(out, key, field);
            }
            let _ = write!(out, "</{name}>");
        }
        Value::Array(items) => {
            let _ = write!(out, "<{name}>");
            for item in items {
                if item.is_null() {
                    let _ = write!(out, "<{ITEM}/>");
                } else {
                    write_element(out, ITEM, item);
                }
            }
            let _ = write!(out, "</{name}>");
        }
        Value::String(s) => {
            let _ = write!(
                out,
                "<{name}>{}</{name}>",
                quick_xml::escape::escape(s.as_str())
            );
        }
        Value::Bool(b) => {
            let _ = write!(out, "<{name}>{b}</{name}>");
        }
        Value::Number(n) => {
            let _ = write!(out, "<{name}>{n}</{name}>");
        }
    }
}

/// Reads a `T` from an XML document (the root element's name is not
/// checked).
///
/// # Errors
/// When the document is not well-formed XML or does not have the shape of
/// `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, XmlError> {
    let root = parse(text)?;
    T::deserialize(&root)
}

/// An element: its text and its child elements, in document order.
#[derive(Debug, Default)]
struct Node {
    name: String,
    text: String,
    children: Vec<Node>,
}

fn parse(text: &str) -> Result<Node, XmlError> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let err = |e: &dyn fmt::Display| XmlError(format!("not well-formed XML: {e}"));
    loop {
        let event = reader.read_event().map_err(|e| err(&e))?;
        match event {
            Event::Start(start) => {
                let node = open(&start, &stack, &root)?;
                stack.push(node);
            }
            Event::Empty(start) => {
                let node = open(&start, &stack, &root)?;
                close(&mut stack, &mut root, node);
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| XmlError("closing tag without an opening one".into()))?;
                close(&mut stack, &mut root, node);
            }
            Event::Text(t) => {
                let text = t.xml_content().map_err(|e| err(&e))?;
                push_text(&mut stack, &text)?;
            }
            Event::CData(t) => {
                let text = t.decode().map_err(|e| err(&e))?;
                push_text(&mut stack, &text)?;
            }
            Event::GeneralRef(r) => {
                let resolved: Cow<'_, str> = if r.is_char_ref() {
                    match r.resolve_char_ref().map_err(|e| err(&e))? {
                        Some(c) => Cow::Owned(c.to_string()),
                        None => return Err(XmlError("invalid character reference".into())),
                    }
                } else {
                    let name = r.decode().map_err(|e| err(&e))?;
                    match quick_xml::escape::resolve_predefined_entity(&name) {
                        Some(s) => Cow::Borrowed(s),
                        None => return Err(XmlError(format!("unknown entity &{name};"))),
                    }
                };
                push_text(&mut stack, &resolved)?;
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError("document ends inside an element".into()));
    }
    root.ok_or_else(|| XmlError("no root element".into()))
}

fn open(
    start: &quick_xml::events::BytesStart<'_>,
    stack: &[Node],
    root: &Option<Node>,
) -> Result<Node, XmlError> {
    if root.is_some() {
        return Err(XmlError("content after the root element".into()));
    }
    if stack.len() >= MAX_DEPTH {
        return Err(XmlError(format!("nested deeper than {MAX_DEPTH} elements")));
    }
    let name = std::str::from_utf8(start.local_name().into_inner())
        .map_err(|e| XmlError(format!("not well-formed XML: {e}")))?;
    Ok(Node {
        name: name.to_owned(),
        ..Node::default()
    })
}

fn close(stack: &mut [Node], root: &mut Option<Node>, node: Node) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => *root = Some(node),
    }
}

fn push_text(stack: &mut [Node], text: &str) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(node) => {
            node.text.push_str(text);
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err(XmlError("text outside the root element".into())),
    }
}

impl Node {
    fn parse_text<T: std::str::FromStr>(&self, what: &str) -> Result<T, XmlError>
    where
        T::Err: fmt::Display,
    {
        self.text.trim().parse().map_err(|e| {
            XmlError(format!(
                "<{}>: {:?} is not {what}: {e}",
                self.name, self.text
            ))
        })
    }

    fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }
}

macro_rules! deserialize_parsed {
    ($($method:ident => $visit:ident, $ty:ty, $what:literal;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
            visitor.$visit(self.parse_text::<$ty>($what)?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = XmlError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        if self.is_leaf() {
            visitor.visit_str(&self.text)
        } else {
            self.deserialize_map(visitor)
        }
    }

    deserialize_parsed! {
        deserialize_bool => visit_bool, bool, "a boolean";
        deserialize_i8 => visit_i8, i8, "an integer";
        deserialize_i16 => visit_i16, i16, "an integer";
        deserialize_i32 => visit_i32, i32, "an integer";
        deserialize_i64 => visit_i64, i64, "an integer";
        deserialize_u8 => visit_u8, u8, "an unsigned integer";
        deserialize_u16 => visit_u16, u16, "an unsigned integer";
        deserialize_u32 => visit_u32, u32, "an unsigned integer";
        deserialize_u64 => visit_u64, u64, "an unsigned integer";
        deserialize_f32 => visit_f32, f32, "a number";
        deserialize_f64 => visit_f64, f64, "a number";
        deserialize_char => visit_char, char, "a character";
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_str(&self.text)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_str(&self.text)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_bytes(self.text.as_bytes())
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_bytes(self.text.as_bytes())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        // An element that is there holds a value; an absent one is `None`
        // through the field's default.
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        if !self.text.trim().is_empty() {
            return Err(XmlError(format!(
                "<{}> should hold <{ITEM}> elements, not text",
                self.name
            )));
        }
        if let Some(other) = self.children.iter().find(|c| c.name != ITEM) {
            return Err(XmlError(format!(
                "<{}> is a list: found <{}> where <{ITEM}> belongs",
                self.name, other.name
            )));
        }
        visitor.visit_seq(Items(self.children.iter()))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_map(Fields {
            children: self.children.iter(),
            value: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        match self.children.as_slice() {
            [] => visitor.visit_enum(self.text.trim().into_deserializer()),
            [variant] => visitor.visit_enum(Variant(variant)),
            _ => Err(XmlError(format!(
                "<{}> should hold one variant element, found {}",
                self.name,
                self.children.len()
            ))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_str(&self.text)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, XmlError> {
        visitor.visit_unit()
    }
}

struct Items<'de>(std::slice::Iter<'de, Node>);

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = XmlError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, XmlError> {
        self.0.next().map(|node| seed.deserialize(node)).transpose()
    }
}

struct Fields<'de> {
    children: std::slice::Iter<'de, Node>,
    value: Option<&'de Node>,
}

impl<'de> MapAccess<'de> for Fields<'de> {
    type Error = XmlError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, XmlError> {
        match self.children.next() {
            Some(node) => {
                self.value = Some(node);
                let key: de::value::StrDeserializer<'_, XmlError> =
                    node.name.as_str().into_deserializer();
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, XmlError> {
        let node = self
            .value
            .take()
            .ok_or_else(|| XmlError("a value was asked for before its key".into()))?;
        seed.deserialize(node)
    }
}

struct Variant<'de>(&'de Node);

impl<'de> EnumAccess<'de> for Variant<'de> {
    type Error = XmlError;
    type Variant = Self;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self), XmlError> {
        let name: de::value::StrDeserializer<'_, XmlError> =
            self.0.name.as_str().into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'de> {
    type Error = XmlError;

    fn unit_variant(self) -> Result<(), XmlError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, XmlError> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, XmlError> {
        de::Deserializer::deserialize_seq(self.0, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, XmlError> {
        de::Deserializer::deserialize_map(self.0, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_cdata_and_comments_are_read() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct T {
            a: String,
            b: u32,
        }
        let t: T = from_str(
            "<?xml version=\"1.0\"?><!-- hi --><t><a>x &amp; y &#65;<![CDATA[<z>]]></a>\n <b> 7 </b></t>",
        )
        .expect("parse");
        assert_eq!(
            t,
            T {
                a: "x & y A<z>".into(),
                b: 7
            }
        );
    }

    #[test]
    fn text_is_escaped_when_written() {
        let xml = to_string("t", &serde_json::json!({"a": "<&>"})).expect("write");
        assert_eq!(xml, "<t><a>&lt;&amp;&gt;</a></t>");
    }

    #[test]
    fn hostile_documents_are_errors_not_panics() {
        let deep = "<a>".repeat(10_000);
        for doc in [
            "",
            "<a>",
            "</a>",
            "<a></b>",
            "<a/><b/>",
            "text",
            "<a>&bogus;</a>",
            deep.as_str(),
        ] {
            assert!(from_str::<serde_json::Value>(doc).is_err(), "{doc:.20}");
        }
    }
}
