// What the VM's identity may do, and no more: release the one KEK (scoped to the key, not the
// vault) and read the sealed model's blobs (scoped to their container).

param vaultName string
param keyName string

@description('The VM\'s (or scale set\'s) system-assigned identity.')
param principalId string

@description('Storage account holding the sealed model; empty: the model comes another way.')
param modelStorageAccount string = ''
param modelContainer string = 'models'

// Built-in role ids (learn.microsoft.com, Azure built-in roles).
var keyReleaseRole = '08bbd89e-9f13-488c-ac41-acfcb10c90ab' // Key Vault Crypto Service Release User
var blobReaderRole = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1' // Storage Blob Data Reader

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource kek 'Microsoft.KeyVault/vaults/keys@2023-07-01' existing = {
  parent: vault
  name: keyName
}

resource release 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(kek.id, principalId, keyReleaseRole)
  scope: kek
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyReleaseRole)
  }
}

resource account 'Microsoft.Storage/storageAccounts@2023-01-01' existing = if (!empty(modelStorageAccount)) {
  name: empty(modelStorageAccount) ? 'unused' : modelStorageAccount
}

resource blobs 'Microsoft.Storage/storageAccounts/blobServices@2023-01-01' existing = if (!empty(modelStorageAccount)) {
  parent: account
  name: 'default'
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-01-01' existing = if (!empty(modelStorageAccount)) {
  parent: blobs
  name: modelContainer
}

resource read 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(modelStorageAccount)) {
  name: guid(container.id, principalId, blobReaderRole)
  scope: container
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobReaderRole)
  }
}
