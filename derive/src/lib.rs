//! Derive macros for `hyperfunc`. Use them through `hyperfunc` (`hyperfunc::Signature`), which
//! re-exports them.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{quote, ToTokens};
use syn::{parse_macro_input, Attribute, Data, DeriveInput, Expr, Fields, Lit, LitStr};

/// Derives `hyperfunc::prompt::HasSignature` for a struct with named fields.
///
/// The struct's doc comment is the instruction; each field carries `#[input(desc = "…")]` or
/// `#[output(desc = "…")]` (the description is optional) and keeps its declaration order. The
/// field's Rust type picks the value type (`String` → text, `f64` → number, `u32` → integer,
/// `bool` → boolean, `Vec<_>` → list, anything else → JSON). `name = "…"` renames a field.
#[proc_macro_derive(Signature, attributes(input, output))]
pub fn derive_signature(input: TokenStream) -> TokenStream {
    let ast = parse_macro_input!(input as DeriveInput);
    expand(&ast)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn expand(ast: &DeriveInput) -> syn::Result<Tokens> {
    let ident = &ast.ident;
    let Data::Struct(data) = &ast.data else {
        return Err(syn::Error::new_spanned(
            ident,
            "#[derive(Signature)] needs a struct with named fields",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            ident,
            "#[derive(Signature)] needs a struct with named fields",
        ));
    };
    let instruction = doc_text(&ast.attrs);
    if instruction.is_empty() {
        return Err(syn::Error::new_spanned(
            ident,
            "#[derive(Signature)]: write the instruction as the struct's doc comment (/// …)",
        ));
    }
    let mut calls = Vec::new();
    let mut outputs = 0;
    for f in &fields.named {
        let fname = f
            .ident
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let mut role = None;
        for attr in &f.attrs {
            let which = if attr.path().is_ident("input") {
                "input"
            } else if attr.path().is_ident("output") {
                "output"
            } else {
                continue;
            };
            if role.is_some() {
                return Err(syn::Error::new_spanned(
                    attr,
                    "a field is either #[input] or #[output], once",
                ));
            }
            let (mut desc, mut name) = (String::new(), fname.clone());
            if !matches!(attr.meta, syn::Meta::Path(_)) {
                attr.parse_nested_meta(|meta| {
                    let value: LitStr = meta.value()?.parse()?;
                    if meta.path.is_ident("desc") {
                        desc = value.value();
                    } else if meta.path.is_ident("name") {
                        name = value.value();
                    } else {
                        return Err(meta.error("expected `desc = \"…\"` or `name = \"…\"`"));
                    }
                    Ok(())
                })?;
            }
            role = Some((which, desc, name));
        }
        let Some((which, desc, name)) = role else {
            return Err(syn::Error::new_spanned(
                f,
                "mark every field of a signature #[input(desc = \"…\")] or #[output(desc = \"…\")]",
            ));
        };
        outputs += usize::from(which == "output");
        let ty = f.ty.to_token_stream().to_string().replace(' ', "");
        let method = syn::Ident::new(&format!("{which}_typed"), proc_macro2::Span::call_site());
        calls.push(quote! {
            .#method(#name, #desc, ::hyperfunc::prompt::FieldType::of_rust(#ty))
        });
    }
    if outputs == 0 {
        return Err(syn::Error::new_spanned(
            ident,
            "a signature needs at least one #[output] field",
        ));
    }
    let (impl_g, ty_g, where_g) = ast.generics.split_for_impl();
    Ok(quote! {
        impl #impl_g ::hyperfunc::prompt::HasSignature for #ident #ty_g #where_g {
            fn signature() -> ::hyperfunc::prompt::Signature {
                ::hyperfunc::prompt::Signature::new(#instruction) #(#calls)*
            }
        }
    })
}

/// The doc comment's lines, trimmed and joined (blank lines kept as paragraph breaks).
fn doc_text(attrs: &[Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    lines.join("\n").trim().to_string()
}
