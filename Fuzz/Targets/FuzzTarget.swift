/// One libFuzzer target: a thin entry point over one of hv's parsers of untrusted bytes.
///
/// Every target is a pure function of its input: it builds what the parser needs (a memfd for
/// guest RAM or an image, a socketpair for a stream), hands the bytes over the way the real
/// caller does, and checks what must hold whatever the bytes were (`FuzzCheck`). A Swift trap, a
/// sanitizer report or a failed check is a crash; a refusal (a thrown error) is the parser doing
/// its job.
public struct FuzzTarget: Sendable {
    /// The name `hv-fuzz`, `bench/fuzz --target` and the corpus folders use.
    public let name: String
    /// Which attack surface this covers and who writes the bytes.
    public let covers: String
    /// Runs one input.
    public let run: @Sendable (UnsafeRawBufferPointer) -> Void

    public init(_ name: String, covers: String, run: @escaping @Sendable (UnsafeRawBufferPointer) -> Void) {
        self.name = name
        self.covers = covers
        self.run = run
    }
}

/// Every target, in the order `hv-fuzz list` prints them.
public enum FuzzTargets {
    public static let all: [FuzzTarget] = [
        IPCTargets.frame, IPCTargets.registerRing, IPCTargets.framePort, IPCTargets.deviceSettings,
        GuestTargets.virtqueue, GuestTargets.scsiDisk, GuestTargets.scsiCDROM,
        GuestTargets.uart, GuestTargets.platform, GuestTargets.firmwareConfig,
        ImageTargets.qcow2, ImageTargets.multiboot, ImageTargets.bzImage, ImageTargets.elfDynamic,
        ImageTargets.stateRecords,
        HostTargets.json, HostTargets.sandboxProfile, HostTargets.controlRequest, HostTargets.vmDefinition,
        HostTargets.firecrackerAPI, HostTargets.pluginManifest, HostTargets.snapshotState, HostTargets.migrationStream,
        NetworkTargets.learningSwitch,
    ]

    /// The target called `name`, if there is one.
    public static func named(_ name: String) -> FuzzTarget? { all.first { $0.name == name } }
}

/// An invariant every input must keep; a violation is a finding, reported like a crash.
enum FuzzCheck {
    static func that(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                     file: StaticString = #fileID, line: UInt = #line) {
        if !condition() { fatalError("fuzz invariant broken: \(message())", file: file, line: line) }
    }
}

/// Reads an input as a sequence of typed values; past its end every read gives zeroes, so a
/// target never has to check lengths and short inputs still reach deep states.
struct FuzzInput {
    private let bytes: UnsafeRawBufferPointer
    private(set) var position = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var isAtEnd: Bool { position >= bytes.count }
    var remaining: Int { max(0, bytes.count - position) }

    mutating func u8() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    mutating func integer<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        var value = T.zero
        for i in 0..<(T.bitWidth / 8) { value |= T(truncatingIfNeeded: u8()) << (8 * i) }
        return value
    }

    mutating func bool() -> Bool { u8() & 1 == 1 }

    /// A value in `0..<bound` (0 when `bound` is 0).
    mutating func below(_ bound: Int) -> Int {
        guard bound > 0 else { return 0 }
        return Int(integer(UInt32.self) % UInt32(truncatingIfNeeded: bound))
    }

    /// Up to `count` bytes (fewer at the end).
    mutating func bytes(_ count: Int) -> [UInt8] {
        let n = min(max(count, 0), remaining)
        defer { position += n }
        return Array(bytes[position..<position + n])
    }

    /// A length-prefixed chunk (one length byte, then that many bytes): lets one input carry
    /// several variable-sized pieces.
    mutating func chunk() -> [UInt8] { bytes(Int(u8())) }

    mutating func rest() -> [UInt8] { bytes(remaining) }
}
