import CHVShim

/// The CPU feature flags a restored guest depends on: the bits of the CPUID leaves that name
/// instruction-set extensions. A guest saved on a host whose KVM offered a feature may be using
/// it (AVX-512 code paths chosen at boot, for instance), so a host whose KVM lacks it must refuse
/// the restore instead of letting the guest fault on its first such instruction.
public enum CPUIDFeatures {
    enum Register { case eax, ebx, ecx, edx }
    private static func value(_ e: kvm_cpuid_entry2, _ r: Register) -> UInt32 {
        switch r {
        case .eax: return e.eax
        case .ebx: return e.ebx
        case .ecx: return e.ecx
        case .edx: return e.edx
        }
    }

    /// (leaf, subleaf, register, names by bit) for the feature words compared.
    private static let words: [(UInt32, UInt32, Register, String, [Int: String])] = [
        (0x1, 0, Register.ecx, "ecx", [0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4.1", 20: "sse4.2", 22: "movbe",
                               23: "popcnt", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand"]),
        (0x1, 0, Register.edx, "edx", [0: "fpu", 4: "tsc", 5: "msr", 8: "cx8", 15: "cmov", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2"]),
        (0x7, 0, Register.ebx, "ebx", [0: "fsgsbase", 3: "bmi1", 5: "avx2", 8: "bmi2", 9: "erms", 16: "avx512f", 17: "avx512dq", 18: "rdseed",
                               19: "adx", 21: "avx512ifma", 23: "clflushopt", 24: "clwb", 28: "avx512cd", 29: "sha", 30: "avx512bw",
                               31: "avx512vl"]),
        (0x7, 0, Register.ecx, "ecx", [1: "avx512vbmi", 5: "waitpkg", 6: "avx512vbmi2", 8: "gfni", 9: "vaes", 10: "vpclmulqdq",
                               11: "avx512vnni", 12: "avx512bitalg", 14: "avx512vpopcntdq", 22: "rdpid"]),
        (0x7, 0, Register.edx, "edx", [4: "fsrm", 8: "avx512vp2intersect", 14: "serialize", 22: "amx-bf16", 23: "avx512fp16", 24: "amx-tile",
                               25: "amx-int8"]),
        (0x8000_0001, 0, Register.ecx, "ecx", [0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch", 16: "fma4", 21: "tbm"]),
        (0x8000_0001, 0, Register.edx, "edx", [11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"]),
        (0xD, 1, Register.eax, "eax", [0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"]),
    ]

    /// The features set in `saved` and clear (or absent) in `host`, by name where hv knows it,
    /// otherwise as "CPUID leaf/subleaf register bit N".
    public static func missing(saved: [kvm_cpuid_entry2], host: [kvm_cpuid_entry2]) -> [String] {
        func find(_ table: [kvm_cpuid_entry2], _ leaf: UInt32, _ subleaf: UInt32) -> kvm_cpuid_entry2? {
            table.first { $0.function == leaf && $0.index == subleaf } ?? table.first { $0.function == leaf && $0.flags & 1 == 0 }
        }
        var missing: [String] = []
        for (leaf, subleaf, register, registerName, names) in words {
            guard let s = find(saved, leaf, subleaf) else { continue }
            let had = value(s, register)
            let offered = find(host, leaf, subleaf).map { value($0, register) } ?? 0
            let lost = had & ~offered
            guard lost != 0 else { continue }
            for bit in 0..<32 where lost & (1 << UInt32(bit)) != 0 {
                missing.append(names[bit] ?? "CPUID 0x\(String(leaf, radix: 16)).\(subleaf) \(registerName) bit \(bit)")
            }
        }
        return missing
    }
}
