// confinfer on Azure: a Key Vault Premium with the exportable KEK under a release policy, the
// network, and one confidential GPU VM (or a scale set of them behind a load balancer) that
// boots its cloud-init user data straight into attested serving.
//
// Deployed by `confinfer deploy --config deploy.toml` (docs/operator-guide.md), which renders
// the user data and runs `az deployment group create` with this file.

targetScope = 'resourceGroup'

param location string = resourceGroup().location

@description('Prefix of every resource name.')
@minLength(3)
@maxLength(16)
param namePrefix string

@description('Key Vault name (globally unique).')
param vaultName string = '${namePrefix}-kv-${take(uniqueString(resourceGroup().id), 6)}'

param keyName string = 'model-kek'

@description('Expiry of the KEK as Unix seconds; 0 means none.')
param keyExpiry int = 0

@description('Address ranges that may reach the vault besides the serving subnet (the model owner\'s, to seal with --key-id).')
param vaultAllowedIpRanges array = []

@description('The attestation authority the KEK\'s release policy trusts.')
param maaAuthority string = 'https://sharedeus.eus.attest.azure.net'

@description('Claims the attestation token must carry for the KEK to be released.')
param releaseClaims array = [
  {
    claim: 'x-ms-isolation-tee.x-ms-attestation-type'
    equals: 'sevsnpvm'
  }
  {
    claim: 'x-ms-isolation-tee.x-ms-compliance-status'
    equals: 'azure-compliant-cvm'
  }
]

@description('Confidential GPU VM size.')
param vmSize string = 'Standard_NCC40ads_H100_v5'

@description('Instances: 1 is one VM with its own public IP; more is a scale set behind a load balancer.')
@minValue(1)
@maxValue(100)
param instanceCount int = 1

param adminUsername string = 'confinfer'

@secure()
param sshPublicKey string

@description('Source range allowed to SSH in; empty (the default) keeps SSH closed.')
param sshSourceRange string = ''

@description('DNS label: the API is served at https://<label>.<region>.cloudapp.azure.com. `confinfer deploy` passes <namePrefix>-<6 hex of SHA-256(resource group + deployment name)>, so that Caddy\'s domain is known before the deployment.')
@minLength(3)
@maxLength(63)
param dnsLabel string = toLower('${namePrefix}-${take(uniqueString(resourceGroup().id), 6)}')

@secure()
@description('cloud-init user data rendered by `confinfer deploy`.')
param userData string

@description('Disk encryption set for customer-managed disk keys; empty: platform-managed.')
param diskEncryptionSetId string = ''

@description('Storage account that holds the sealed model; empty: none.')
param modelStorageAccount string = ''
param modelContainer string = 'models'

@description('The Ubuntu image for confidential VMs.')
param image object = {
  publisher: 'Canonical'
  offer: '0001-com-ubuntu-confidential-vm-jammy'
  sku: '22_04-lts-cvm'
  version: 'latest'
}

module keyvault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    vaultName: vaultName
    location: location
    keyName: keyName
    keyExpiry: keyExpiry
    maaAuthority: maaAuthority
    releaseClaims: releaseClaims
    subnetId: network.outputs.subnetId
    allowedIpRanges: vaultAllowedIpRanges
  }
}

module network 'modules/network.bicep' = {
  name: 'network'
  params: {
    location: location
    namePrefix: namePrefix
    dnsLabel: dnsLabel
    sshSourceRange: sshSourceRange
    createPublicIp: instanceCount == 1
  }
}

module single 'modules/cvm.bicep' = if (instanceCount == 1) {
  name: 'cvm'
  params: {
    location: location
    namePrefix: namePrefix
    vmSize: vmSize
    adminUsername: adminUsername
    sshPublicKey: sshPublicKey
    subnetId: network.outputs.subnetId
    publicIpId: network.outputs.publicIpId
    userData: userData
    diskEncryptionSetId: diskEncryptionSetId
    image: image
  }
}

module scaleSet 'modules/cvmss.bicep' = if (instanceCount > 1) {
  name: 'cvmss'
  params: {
    location: location
    namePrefix: namePrefix
    vmSize: vmSize
    adminUsername: adminUsername
    instanceCount: instanceCount
    sshPublicKey: sshPublicKey
    subnetId: network.outputs.subnetId
    dnsLabel: dnsLabel
    userData: userData
    diskEncryptionSetId: diskEncryptionSetId
    image: image
  }
}

var principalId = instanceCount == 1 ? single.outputs.principalId : scaleSet.outputs.principalId

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    vaultName: keyvault.outputs.vaultName
    keyName: keyvault.outputs.keyName
    principalId: principalId
    modelStorageAccount: modelStorageAccount
    modelContainer: modelContainer
  }
}

output fqdn string = instanceCount == 1 ? network.outputs.fqdn : scaleSet.outputs.fqdn
output keyId string = keyvault.outputs.keyId
output principalId string = principalId
output vaultUri string = keyvault.outputs.vaultUri
