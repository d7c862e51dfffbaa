// A plugin imports HVDeviceSDK alone: the wire types it uses (BootState, Capabilities, LogRecord,
// Resource) and the descriptor type of its host files come along.
@_exported import HVIPC
@_exported import HVSys
