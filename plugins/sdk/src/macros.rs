//! The `tasks!` macro: each declared function checked one at a time, so a malformed one is
//! named in an error that says what is wrong with it, then all of them emitted with the
//! component's `handler` export.

/// Declare a plugin's tasks: each `#[task(name = "...", defaults...)]` function becomes a task.
///
/// Parameters (`name: Type` or `mut name: Type`) are bound from Celery's `args` (by position)
/// and `kwargs` (by name); each must implement `serde::Deserialize`. An `Option<T>` parameter
/// may be left out. The function returns `Result<T, E>` with `T: serde::Serialize` and any
/// error `?` turns into a [`Failure`](crate::Failure) (a standard error, `String`, `&str`,
/// `Failure` itself), or nothing at all (the result is `null`). Defaults that may follow the
/// name are the methods of [`TaskDefaults`](crate::TaskDefaults): `queue`, `max_retries`,
/// `retry_backoff`, `retry_backoff_max`, `retry_jitter`, `soft_time_limit`, `time_limit`,
/// `rate_limit`, `autoretry_for`.
///
/// Task functions are synchronous (the SDK's HTTP client blocks), not generic, and take plain
/// named parameters; anything else is refused with an error naming the function.
///
/// The plugin's version is its crate's `version`. Doc comments may go before or after
/// `#[task(...)]`, other attributes after it. Use the macro once per plugin crate: it exports
/// the component's `handler` interface.
#[macro_export]
macro_rules! tasks {
    ($($items:tt)*) => {
        $crate::__tasks_check! { [] $($items)* }
    };
}

/// Checks `tasks!`'s items one at a time into the accumulator, then emits them. A parameter
/// is matched as idents before its `:` (`x` or `mut x`: `$(mut)? $arg:ident` is ambiguous,
/// `mut` being an ident too). The arms after the first say what is wrong
/// with an item that does not fit.
#[doc(hidden)]
#[macro_export]
macro_rules! __tasks_check {
    (
        [$($done:tt)*]
        $(#[doc = $doc:literal])*
        #[task(name = $name:literal $(, $key:ident = $value:expr)* $(,)?)]
        $(#[$attr:meta])*
        $vis:vis fn $func:ident ( $($($arg:ident)+ : $ty:ty),* $(,)? ) $(-> $ret:ty)? $body:block
        $($rest:tt)*
    ) => {
        $crate::__tasks_check! {
            [
                $($done)*
                $(#[doc = $doc])*
                #[task(name = $name $(, $key = $value)*)]
                $(#[$attr])*
                $vis fn $func ( $($($arg)+ : $ty),* ) $(-> $ret)? $body
            ]
            $($rest)*
        }
    };
    ([$($done:tt)*]) => {
        $crate::__tasks_emit! { $($done)* }
    };
    // Only a malformed item gets here: its doc comments are set aside, so the arms below
    // need not match them (a doc repetition before `#[$task:ident` is ambiguous).
    ([$($done:tt)*] #[doc = $doc:literal] $($rest:tt)*) => {
        $crate::__tasks_check! { [$($done)*] $($rest)* }
    };
    ([$($done:tt)*] $(#[$a:meta])* $vis:vis async fn $func:ident $($rest:tt)*) => {
        $crate::__tasks_refuse! { $func "tasks!: a task function cannot be `async`: tasks run synchronously (taskhost_sdk::http blocks), so remove `async`" }
    };
    ([$($done:tt)*] $(#[$a:meta])* $vis:vis fn $func:ident < $($rest:tt)*) => {
        $crate::__tasks_refuse! { $func "tasks!: a task function cannot be generic: its parameters need the concrete types its JSON arguments are read into" }
    };
    (
        [$($done:tt)*]
        #[task(name = $name:literal $(, $key:ident = $value:expr)* $(,)?)]
        $(#[$attr:meta])*
        $vis:vis fn $func:ident $params:tt $($rest:tt)*
    ) => {
        $crate::__tasks_refuse! { $func "tasks!: each parameter of a task function must be `name: Type` or `mut name: Type` (no patterns, no `self`), and a return type follows `->`: `fn name(a: A, mut b: B) -> Result<T> { ... }`" }
    };
    ([$($done:tt)*] #[$task:ident $($attr:tt)*] $($rest:tt)*) => {
        $crate::__tasks_refuse! { $task "tasks!: write `#[task(name = \"plugin.task\", key = value, ...)]`, the name first as a string literal, then defaults: queue, max_retries, retry_backoff, retry_backoff_max, retry_jitter, soft_time_limit, time_limit, rate_limit, autoretry_for" }
    };
    ([$($done:tt)*] $vis:vis fn $func:ident $($rest:tt)*) => {
        $crate::__tasks_refuse! { $func "tasks!: this function needs `#[task(name = \"...\")]` before it, the name producers send it by" }
    };
    ([$($done:tt)*] $first:tt $($rest:tt)*) => {
        ::core::compile_error!(::core::concat!(
            "tasks!: expected `#[task(name = \"...\")] fn name(arg: Type, ...) -> Result<T> ",
            "{ ... }`, found `", ::core::stringify!($first), "`"
        ));
    };
}

/// Emits the checked task functions and the component's `handler` export.
#[doc(hidden)]
#[macro_export]
macro_rules! __tasks_emit {
    ($(
        $(#[doc = $doc:literal])*
        #[task(name = $name:literal $(, $key:ident = $value:expr)*)]
        $(#[$attr:meta])*
        $vis:vis fn $func:ident ( $($($arg:ident)+ : $ty:ty),* ) $(-> $ret:ty)? $body:block
    )*) => {
        $(
            $(#[doc = $doc])*
            $(#[$attr])*
            $vis fn $func($($($arg)+: $ty),*) $(-> $ret)? $body
        )*

        struct __TaskhostPlugin;

        impl $crate::__private::Guest for __TaskhostPlugin {
            fn version() -> ::std::string::String {
                ::std::string::String::from(env!("CARGO_PKG_VERSION"))
            }

            fn tasks() -> ::std::vec::Vec<$crate::__private::TaskInfo> {
                ::std::vec![$(
                    $crate::__private::task_info(
                        $name,
                        $crate::TaskDefaults::new() $(.$key($value))*,
                    )
                ),*]
            }

            fn run(
                task: $crate::__private::Task,
            ) -> ::std::result::Result<::std::string::String, $crate::__private::WitFailure> {
                $crate::__private::run(task, |name, args| match name {
                    $(
                        $name => {
                            // Bound in order, then checked for leftovers, before the call.
                            let bound = ($(
                                args.next::<$ty>($crate::__private::parameter(
                                    stringify!($($arg)+),
                                ))?,
                            )*);
                            args.finish()?;
                            $crate::__private::output($crate::__private::Apply::apply($func, bound))
                        }
                    )*
                    other => ::std::result::Result::Err($crate::__private::not_served(other)),
                })
            }
        }

        $crate::bindings::export!(__TaskhostPlugin with_types_in $crate::bindings);
    };
}

/// Refuses a malformed `tasks!` item with `message`, reported at the author's token `tok`
/// (`compile_error!` could only point at the whole `tasks!` block): the token names a
/// deprecated unit struct that is then used with the lint denied.
#[doc(hidden)]
#[macro_export]
macro_rules! __tasks_refuse {
    ($tok:ident $message:literal) => {
        const _: () = {
            #[deprecated(note = $message)]
            #[allow(non_camel_case_types, dead_code)]
            struct $tok;
            #[deny(deprecated)]
            #[allow(dead_code)]
            fn __taskhost_refused() {
                let _ = $tok;
            }
        };
    };
}
