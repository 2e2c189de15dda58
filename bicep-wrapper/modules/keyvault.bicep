// Key Vault Premium (HSM-backed keys) with RBAC, soft delete and purge protection, and the KEK:
// an exportable RSA-HSM key whose release policy admits only an attested confidential VM.

@description('Vault name (globally unique, 3-24 characters).')
param vaultName string

param location string

@description('Name of the key encryption key (KEK) that wraps each model data key.')
param keyName string = 'model-kek'

@description('RSA key size of the KEK.')
@allowed([2048, 3072, 4096])
param keySize int = 3072

@description('Microsoft Azure Attestation authority the release policy trusts (https URL).')
param maaAuthority string

@description('Claims the attestation token must carry, in Key Vault release-policy grammar.')
param releaseClaims array

@description('Expiry of the KEK as Unix seconds; 0 means none.')
param keyExpiry int = 0

@description('The serving subnet: the only network besides allowedIpRanges that reaches the vault.')
param subnetId string

@description('Address ranges allowed to reach the vault besides the serving subnet (e.g. the model owner\'s, for `confinfer seal --key-id`).')
param allowedIpRanges array = []

// The release policy, the same grammar as confinfer/policy.py reads.
var releasePolicy = {
  version: '1.0.0'
  anyOf: [
    {
      authority: maaAuthority
      allOf: releaseClaims
    }
  ]
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: vaultName
  location: location
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'premium' // HSM-backed keys: RSA-HSM needs Premium
    }
    enableRbacAuthorization: true // roles, not access policies: the release role is scoped to the key
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true // a deleted KEK (and every model sealed to it) can be recovered
    publicNetworkAccess: 'Enabled' // reached through the subnet's service endpoint
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Deny' // only the serving subnet and the listed ranges
      virtualNetworkRules: [
        {
          id: subnetId
        }
      ]
      ipRules: [for range in allowedIpRanges: { value: range }]
    }
  }
}

resource kek 'Microsoft.KeyVault/vaults/keys@2023-07-01' = {
  //checkov:skip=CKV_AZURE_40:keyExpiry sets exp; by default a KEK does not expire, since every model sealed to it would become unreadable on that day (rotate and re-seal instead, docs/operator-guide.md)
  parent: vault
  name: keyName
  properties: {
    kty: 'RSA-HSM'
    keySize: keySize
    keyOps: [
      'wrapKey'
      'unwrapKey'
      'encrypt'
      'decrypt'
    ]
    attributes: {
      enabled: true
      exportable: true // Secure Key Release exports it, wrapped to the VM's vTPM-bound key
      exp: (keyExpiry > 0) ? keyExpiry : null
    }
    release_policy: {
      contentType: 'application/json; charset=utf-8'
      // base64url, as Key Vault wants the policy blob
      data: replace(replace(replace(base64(string(releasePolicy)), '+', '-'), '/', '_'), '=', '')
    }
  }
}

output vaultName string = vault.name
output vaultUri string = vault.properties.vaultUri
output keyName string = kek.name
output keyId string = kek.properties.keyUriWithVersion
