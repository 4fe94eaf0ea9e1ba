//! The CPU features the binary was compiled to use, checked against the CPU it runs on before
//! anything else runs.
//!
//! Why: x86-64 builds target `x86-64-v3` (`.cargo/config.toml`: AVX2, BMI1/2, FMA, LZCNT,
//! MOVBE; every x86 server CPU since 2013–2015, and RHEL 10's baseline), which with fat LTO
//! is ~9% fewer instructions per forwarded request (docs/performance.md: "The build"). On an
//! older CPU, or a VM whose CPU model hides AVX2 (QEMU's default `qemu64`), such a binary
//! would die of `SIGILL` at some later instruction; this check turns that into one line naming
//! the missing feature and the build that runs there, and exit code 2.
//!
//! A build without those features (`PORTABLE_BUILD`) assumes nothing here: what is checked is
//! what `cfg!(target_feature)` says this binary was compiled for.
//!
//! The check itself must not need the features it checks: code compiled for `x86-64-v3` may
//! use AVX encodings for any copy. So it is straight-line CPUID reads and bit tests, and its
//! answer is a static string: no `Vec`, no formatting (`main`'s code up to the call of
//! `cli_main`, and std's `write_all` it calls, were read in the release binary: no AVX or
//! BMI instruction).

/// The build for a CPU without the features the default build assumes (a macro, so the
/// refusal's `concat!` can hold it).
macro_rules! portable_build {
    () => {
        "RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
    };
}
pub const PORTABLE_BUILD: &str = portable_build!();

/// The first of `features` that `$assumed!` says this build uses and `$has!` says the CPU
/// lacks, as the line to print; `None` when there is none. The two questions are macros
/// because `cfg!` takes a literal name and each name has its own CPUID bit (and so the tests
/// can ask them of a made-up CPU).
macro_rules! first_missing {
    ($assumed:ident, $has:ident; $($f:tt),* $(,)?) => {{
        let mut line = None;
        $(
            if line.is_none() && $assumed!($f) && !$has!($f) {
                line = Some(concat!(
                    "keygate: error: this CPU lacks ", $f,
                    ", which this build of keygate was compiled to use (x86-64-v3); build it \
                     for this machine with: ", portable_build!(), "\n"
                ));
            }
        )*
        line
    }};
}

/// Every feature of `x86-64-v3` beyond the x86-64 baseline, by rustc's `target_feature` names.
macro_rules! v3_features {
    ($assumed:ident, $has:ident) => {
        first_missing!(
            $assumed, $has;
            "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cmpxchg16b", "avx", "avx2",
            "bmi1", "bmi2", "fma", "f16c", "lzcnt", "movbe", "xsave",
        )
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! compiled_for {
    ($f:tt) => {
        cfg!(target_feature = $f)
    };
}

/// Whether this CPU has `$f`, from CPUID itself. Not `is_x86_feature_detected!`: it answers
/// `true` without asking for any feature the build was compiled with, which is exactly what
/// is in question here.
#[cfg(target_arch = "x86_64")]
macro_rules! cpu_has {
    ("sse3") => {
        cpuid_bit(1, Reg::Ecx, 0)
    };
    ("ssse3") => {
        cpuid_bit(1, Reg::Ecx, 9)
    };
    ("fma") => {
        cpuid_bit(1, Reg::Ecx, 12)
    };
    ("cmpxchg16b") => {
        cpuid_bit(1, Reg::Ecx, 13)
    };
    ("sse4.1") => {
        cpuid_bit(1, Reg::Ecx, 19)
    };
    ("sse4.2") => {
        cpuid_bit(1, Reg::Ecx, 20)
    };
    ("movbe") => {
        cpuid_bit(1, Reg::Ecx, 22)
    };
    ("popcnt") => {
        cpuid_bit(1, Reg::Ecx, 23)
    };
    ("xsave") => {
        cpuid_bit(1, Reg::Ecx, 26)
    };
    // AVX also needs the OS to save its registers (OSXSAVE, bit 27: XSAVE enabled by the OS).
    ("avx") => {
        cpuid_bit(1, Reg::Ecx, 28) && cpuid_bit(1, Reg::Ecx, 27)
    };
    ("f16c") => {
        cpuid_bit(1, Reg::Ecx, 29)
    };
    ("bmi1") => {
        cpuid_bit(7, Reg::Ebx, 3)
    };
    ("avx2") => {
        cpuid_bit(7, Reg::Ebx, 5)
    };
    ("bmi2") => {
        cpuid_bit(7, Reg::Ebx, 8)
    };
    ("lzcnt") => {
        cpuid_bit(0x8000_0001, Reg::Ecx, 5)
    };
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
}

/// Bit `bit` of register `reg` of CPUID leaf `leaf` (subleaf 0); false for a leaf the CPU
/// does not have.
#[cfg(target_arch = "x86_64")]
fn cpuid_bit(leaf: u32, reg: Reg, bit: u32) -> bool {
    use std::arch::x86_64::__cpuid_count;
    let highest = __cpuid_count(leaf & 0x8000_0000, 0).eax;
    if leaf > highest {
        return false;
    }
    let r = __cpuid_count(leaf, 0);
    let word = match reg {
        Reg::Ebx => r.ebx,
        Reg::Ecx => r.ecx,
    };
    word >> bit & 1 == 1
}

/// The line to print and exit on when this CPU lacks a feature this binary was compiled to
/// use; `None` when it may run. Other architectures assume nothing beyond their baseline.
pub fn unsupported() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    return v3_features!(compiled_for, cpu_has);
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(test)]
mod tests {
    macro_rules! assumed {
        ($f:tt) => {
            true
        };
    }
    macro_rules! lacks_avx2_and_bmi2 {
        ("avx2") => {
            false
        };
        ("bmi2") => {
            false
        };
        ($f:tt) => {
            true
        };
    }
    macro_rules! has_all {
        ($f:tt) => {
            true
        };
    }
    macro_rules! has_none {
        ($f:tt) => {
            false
        };
    }
    macro_rules! not_assumed {
        ($f:tt) => {
            false
        };
    }

    #[test]
    fn the_first_missing_feature_is_named_with_the_build_that_runs_there() {
        let line = v3_features!(assumed, lacks_avx2_and_bmi2).expect("avx2 is missing");
        assert!(line.contains("lacks avx2,"), "{line}");
        assert!(line.contains(super::PORTABLE_BUILD), "{line}");
        assert!(line.ends_with('\n'));
        assert_eq!(v3_features!(assumed, has_all), None);
        assert_eq!(
            v3_features!(not_assumed, has_none),
            None,
            "a portable build asks nothing of the CPU"
        );
        assert!(v3_features!(assumed, has_none)
            .expect("sse3 is missing")
            .contains("lacks sse3,"));
    }

    /// The CPUID bits read here against the kernel's reading of the same CPU: a wrong bit
    /// number would let a binary start where it cannot run, or refuse one where it can.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn each_feature_read_from_cpuid_is_the_one_the_kernel_reports() {
        use super::{cpuid_bit, Reg};
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .expect("a flags line");
        // (our name, the kernel's name, what cpu_has! reads)
        let rows = [
            ("sse3", "pni", cpu_has!("sse3")),
            ("ssse3", "ssse3", cpu_has!("ssse3")),
            ("fma", "fma", cpu_has!("fma")),
            ("cmpxchg16b", "cx16", cpu_has!("cmpxchg16b")),
            ("sse4.1", "sse4_1", cpu_has!("sse4.1")),
            ("sse4.2", "sse4_2", cpu_has!("sse4.2")),
            ("movbe", "movbe", cpu_has!("movbe")),
            ("popcnt", "popcnt", cpu_has!("popcnt")),
            ("xsave", "xsave", cpu_has!("xsave")),
            ("avx", "avx", cpu_has!("avx")),
            ("f16c", "f16c", cpu_has!("f16c")),
            ("bmi1", "bmi1", cpu_has!("bmi1")),
            ("avx2", "avx2", cpu_has!("avx2")),
            ("bmi2", "bmi2", cpu_has!("bmi2")),
            ("lzcnt", "abm", cpu_has!("lzcnt")),
        ];
        for (ours, kernel, read) in rows {
            assert_eq!(
                read,
                flags.contains(&kernel),
                "{ours} (the kernel's {kernel})"
            );
        }
        assert!(
            !cpuid_bit(0x8000_00ff, Reg::Ecx, 0),
            "a leaf past the highest reads as 0"
        );
    }

    #[test]
    fn the_machine_running_the_tests_runs_this_build() {
        // The tests were compiled with the binary's flags: had this CPU lacked an assumed
        // feature they could have died of SIGILL already, so the check must agree.
        assert_eq!(super::unsupported(), None);
    }
}
